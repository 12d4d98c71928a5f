"""GLIP (grounded language-image pre-training) detector parts as Flax Linen modules."""
