"""The boundary of a multipart request body, checked before a parser is made for it, the same for every door that
takes one (photo upload, STOW-RS).

python-multipart refuses a boundary over 256 bytes by raising from its constructor, which the doors did not expect:
a 257-character boundary was a 500. RFC 2046 5.1.1 allows 1 to 70 characters (`boundary := 0*69<bchars>
bcharsnospace`): a longer one is refused here with a 400 that says so.
"""

from __future__ import annotations

MAX_BOUNDARY = 70


def boundary_problem(boundary: str | bytes) -> str | None:
    """What is wrong with the Content-Type's boundary parameter, as a sentence for the client, or None."""
    if not boundary:
        return "the Content-Type has no boundary parameter (or an empty one)"
    if len(boundary) > MAX_BOUNDARY:
        return f"the multipart boundary is {len(boundary)} characters: RFC 2046 (5.1.1) allows 1 to {MAX_BOUNDARY}"
    return None
