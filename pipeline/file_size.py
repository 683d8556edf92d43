"""How large a run's output files are: the one default, read by the sink and the specs."""

# Rows per output file, by their size in memory (Ray's `min_bytes_per_file`): our rows'
# size varies a thousandfold between models (three RLE strings of a 32-px image; hundreds
# of masks of a 1500-px one), so a row count cannot give files of one size. Parquet's
# encoding makes the file smaller than this (2.5× for the threshold model's RLE strings,
# BENCHMARKS.md, issue 25). A killed run redoes at most the rows not yet in a staged file:
# each write task's bundle.
FILE_MIB = 128
