"""The model: image references, TARGET URLs, descriptors, media types, platforms, manifest parsing,
digest-checking streams and the error tree.  Pure: standard library only, no I/O."""
