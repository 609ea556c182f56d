"""The boundary of a multipart request body, checked before a parser is made for it, the same for every door that
takes one (photo upload, STOW-RS).

python-multipart refuses a boundary over 256 bytes by raising from its constructor, which the doors did not expect:
a 257-character boundary was a 500. It is refused here with a 400 that says so. RFC 2046 5.1.1 allows 1 to 70
characters, but senders go past that: Orthanc's DICOMweb plugin sends two UUIDs joined (73), and refusing those
broke its STOW-RS to us. So the bound is the parser's.
"""

from __future__ import annotations

MAX_BOUNDARY = 256  # python-multipart's


def boundary_problem(boundary: str | bytes) -> str | None:
    """What is wrong with the Content-Type's boundary parameter, as a sentence for the client, or None."""
    if not boundary:
        return "the Content-Type has no boundary parameter (or an empty one)"
    if len(boundary) > MAX_BOUNDARY:
        return f"the multipart boundary is {len(boundary)} characters: at most {MAX_BOUNDARY} are taken (RFC 2046 allows 70)"
    return None
