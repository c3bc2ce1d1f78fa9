"""The tenant portal: one server-rendered page per tenant, behind a log-in with its database credentials."""
