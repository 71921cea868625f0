"""Command-line tools around training: audit, study, report, export and the embedded-data cache (each ``python -m psdclip.tools.<name>``)."""
