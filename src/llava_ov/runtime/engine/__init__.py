"""The paged engine: scheduler, KV block pool, paged language model."""
