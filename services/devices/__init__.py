"""Devices: the reference device client, realistic photos, and a fleet that simulates a site."""
