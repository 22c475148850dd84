"""Sources turn a manifest entry into a plan: a commit and the files (path, size, hash) to stage."""
