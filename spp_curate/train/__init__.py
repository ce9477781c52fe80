"""The reference trainer: SSL on pair shards with semantic positives, evaluation, and the SePP-ID loop."""
