"""The engine: the one walk of a content graph (walk.py), the copy built on it (copy.py), the checked
blob stream (blobs.py), the retry policy (retry.py) and cancellation (cancel.py).  It knows endpoints
only by protocol (protocols.py: Source, Destination, Locator); no HTTP, no files, no terminal."""
