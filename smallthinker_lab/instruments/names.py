"""The names record() and Recording share: the kinds of data an instrument records and the recording format."""

KINDS = ("experts", "neurons", "kv", "cache", "timing")
FORMAT_VERSION = 1
