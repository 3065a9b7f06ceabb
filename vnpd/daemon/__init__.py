"""`vnpd run`: inbox, journal, jobs, scheduling, completion, status and metrics."""
