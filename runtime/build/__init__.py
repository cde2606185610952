"""The incremental build: what is up to date, the run, the jobs and the executors that run
them, progress, the command line's runtime side. Imports `method` and `files`."""
