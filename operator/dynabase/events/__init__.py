"""Tenant events kept in Postgres (both modes) and the signed webhooks sent for some of them."""
