"""`facecurate browse`: a local read-only web app over one dataset version (queries, app, templates)."""
