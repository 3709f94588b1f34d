"""What a run tells its user: progress, the manifest, figures, the report page, metrics, trace."""
