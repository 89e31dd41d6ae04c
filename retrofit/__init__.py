"""cadrelu's library: retrofit trained ReLU networks with CompetitiveReLU or MRePU."""
