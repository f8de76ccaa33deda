"""Codes and their ranking: the Hamming engine, the metrics, inference encoders and the codes-file format."""
