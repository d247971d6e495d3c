"""The shipper: copies stored photos to S3 under a bandwidth cap, once each."""
