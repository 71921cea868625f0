"""Lightning callbacks for watching a run: progress reporting and media (heatmaps, confusion matrix, retrieval)."""
