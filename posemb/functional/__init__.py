"""Layer 1: pure functions on tensors (no modules, no state), each testable against float64."""
