"""Stripe: `dynabase webhooks` and `dynabase billing close`.

Entry-point layer, beside kube and headless. The webhooks only change the
declaration (`spec.tier` of a TenantDatabase, in Kubernetes or in the GitOps
repository) and remember each org's Stripe customer; the operator or headless
mode then applies the tier with the usual upgrade/downgrade rules. The month-end
close sends each tenant's overage to Stripe as invoice items, exactly once
(``close``). Neither talks to the tenant backends itself: the month's figures
are handed to the close already priced.
"""
