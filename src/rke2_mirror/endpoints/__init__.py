"""Endpoints: where images are read from and written to.  registry.py (v2 API; auth.py, harbor.py,
transport wrappers for retry, request rate and pull budget), layout.py (OCI layout directories: save's
work dir), ociarchive.py and tarfiles.py (OCI archives, split parts), nodetarball.py (tarballs for an
RKE2 node's agent/images: manifest.json beside index.json), dockerarchive.py and
compression.py (docker save / RKE2 tarballs), routing.py (which endpoint serves a reference)."""
