"""Codes and their ranking: the Hamming engine, metrics, inference encoders, the codes file,
hits as users see them."""
