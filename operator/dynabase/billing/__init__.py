"""`dynabase webhooks`: Stripe subscription events change a tenant's declared tier.

Entry-point layer, beside kube and headless. It only changes the declaration
(`spec.tier` of a TenantDatabase, in Kubernetes or in the GitOps repository);
the operator or headless mode then applies it with the usual upgrade/downgrade
rules. It never talks to the backends itself.
"""
