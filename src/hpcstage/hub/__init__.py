"""Hub repos into the hub cache: `planner` (which files, at which commit, where they go: no I/O), `engine`
(units, scheduler, file stager: the bytes) and `pull` (one pull of Hub entries: plan, execute, record).
The manifest level (data entries too, and writing `hpcstage.lock`) is staging.py's.
"""
