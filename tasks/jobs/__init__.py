"""Jobs that are not a plain run (retry, reparse), and the checks before any model loads."""
