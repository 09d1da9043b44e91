"""Webhooks: targets.py decides which callback URLs a task may name and where a POST may go (the
SSRF rules, at submit and before every try); sender.py, a thread of each worker, claims due
deliveries from the outbox (webhook_deliveries), signs them (signing.py, Standard Webhooks) and records
every try."""
