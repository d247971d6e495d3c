"""The gateway: the devices' HTTP ingest API (``POST /v1/photos``)."""
