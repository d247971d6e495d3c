"""What the gateway, the store keeper and the shipper share: config, contracts, clients."""
