"""The store keeper: keeps the local store honest and is the operators' window into the site."""
