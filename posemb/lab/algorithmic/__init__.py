"""The algorithmic length-generalization suite (``posemb tasks``): generated tasks trained on short
instances and scored on longer ones, for every registered positional scheme."""
