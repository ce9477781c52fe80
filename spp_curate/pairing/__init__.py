"""Mining semantic positive pairs: kNN search, the pair rules, and the quality report."""
