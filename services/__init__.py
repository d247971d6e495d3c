"""photoferry: devices to a local store, then to S3 under a bandwidth cap."""
