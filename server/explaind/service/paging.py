"""Page sizes and page tokens of the List RPCs.

Two kinds of token: an offset into a set's samples, a list that only grows at its end,
named for the set and its uid (a set deleted and created again under its id is another
set, whose samples an earlier set's offset would page), and a resume point
``"<listing>/<create_time>/<id>"``, for lists whose items come and go while a client
pages (operations, sample sets, head versions): an offset would then skip or repeat
items. The listing's name makes a token from one list an error in another, where it
would resume at an unrelated point, typically past the end: an empty last page. A
listing kept to one caller's items (owner=) or to some of them (kind=, state=) is named
for those too, so its tokens are refused by a listing asked with other ones, as AIP-158
asks (it would resume at the right time, but among other items than page one's).

Both carry their format's version, ``"2:<listing>/<create_time>/<id>"`` and
``"3:samples[set=<id>]/<uid>/<offset>"`` (version 3: version 2's ``"2:<offset>"`` named
no set, and is read as before; a release rolled back to says the new one is a newer
release's), so that a later release that changes what a token holds refuses (or
converts) this one's rather than misreading them, and a release rolled back to tells a
newer one's from a damaged one; tokens without one (version 1, handed out before
versions, which a client may hold across an upgrade; a bare offset is also how the SDK
starts a set's samples at an index, against any release) read as they always did, and
one of a version this release does not know is INVALID_ARGUMENT telling to list from the
start."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TypeVar
from urllib.parse import quote, unquote

from google.protobuf.message import Message

from ..config import CALLER_NAME
from ..errors import InvalidArgument

_MAX_OFFSET = 2**63 - 1  # SQLite's OFFSET is a signed 64-bit integer
# The format of the page tokens written, their "<version>:" prefix. Version 1's have none:
# a resume point begins with its listing's name, never a digit; an offset is digits alone.
PAGE_TOKEN_VERSION = 2
# A set's samples' tokens name the set and its uid from version 3 on; version 2's were
# "2:<offset>". A new version, not new contents under 2: a release that reads 2 says a
# version-3 token is a newer release's, where it would take one of 2 it cannot read for damaged.
SAMPLES_PAGE_TOKEN_VERSION = 3
_NEWEST_PAGE_TOKEN_VERSION = max(PAGE_TOKEN_VERSION, SAMPLES_PAGE_TOKEN_VERSION)
_VERSION_PREFIX = re.compile(r"([0-9]{1,9}):")
_FLOAT_REPR = re.compile(r"[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?")
# The listing of a set's samples (listing_name("samples", set=...): ids need no quoting) and
# a set's uid (SampleSet.uid: a lowercase UUID), as an offset token holds them.
_SAMPLES_LISTING = re.compile(r"samples\[set=([a-z0-9][a-z0-9_-]{0,62})\]")
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# What listing_name writes (a quoted value is "%XX" escapes and URL-safe characters); a
# token's name that is not is no token of ours, and is not echoed back as words.
_LISTING_NAME = re.compile(rf"[a-z_]+(\[[a-z_]+=[%A-Za-z0-9_.~-]*(,[a-z_]+=[%A-Za-z0-9_.~-]*)*\])?(@{CALLER_NAME.pattern})?")
# A repeated message field costs a tag byte and a length varint (at most 5 bytes for
# sizes below 4 GiB); the headroom covers next_page_token.
_FIELD_OVERHEAD = 6
_RESPONSE_HEADROOM = 1024
_M = TypeVar("_M", bound=Message)


def page_limit(size: int, default: int, maximum: int) -> int:
    """The number of items to return for a request's ``page_size`` (0 means ``default``)."""
    if size < 0:
        raise InvalidArgument("must not be negative", field="page_size")
    return min(size or default, maximum)


def bad_page_token(token: str) -> InvalidArgument:
    return InvalidArgument(f"{token[:40]!r} is not a page token from a previous response", field="page_token")


def _token_body(token: str, versions: tuple[int, ...] = (PAGE_TOKEN_VERSION,)) -> tuple[int, str]:
    """(version, body) of a non-empty page token of one of the prefixed ``versions`` its
    listing reads, without the prefix, or of version 1 (unprefixed) as it is. A prefix of
    another version this release knows (below: no release wrote one; another listing's)
    is no token of the listing; one above all it knows is INVALID_ARGUMENT telling to list
    from the start."""
    version = _VERSION_PREFIX.match(token)
    if version is None:
        return 1, token
    if int(version[1]) > _NEWEST_PAGE_TOKEN_VERSION:
        raise InvalidArgument(f"{token[:40]!r} is a page token of format version {int(version[1])}, which this server does not read "
                              f"(it writes version {max(versions)}): list from the start, without a page_token", field="page_token")
    if int(version[1]) not in versions:  # version 1's have no prefix, and this release reads them
        raise bad_page_token(token)
    return int(version[1]), token[version.end():]


def offset_page(token: str, size: int, default: int, maximum: int) -> tuple[int, int, tuple[str, str] | None]:
    """(offset, limit, named) into a set's samples from a page token and a page size;
    ``named``: the (id, uid) of the set a token of SAMPLES_PAGE_TOKEN_VERSION names (see
    offset_token), for require_token_of_set to check once the set listed is read. A bare
    offset (version 1's, and the SDK's start), or one of version 2 (the releases before the
    set was named), names none (None) and is read as it always was. Only the form is
    checked here, before the set is looked up: a malformed token or size is the request's
    mistake, for an unknown set too."""
    limit = page_limit(size, default, maximum)
    if not token:
        return 0, limit, None
    version, offset = _token_body(token, (PAGE_TOKEN_VERSION, SAMPLES_PAGE_TOKEN_VERSION))
    named = None
    if version == SAMPLES_PAGE_TOKEN_VERSION:  # "samples[set=<id>]/<uid>/<offset>"
        name, token_uid, offset = (offset.split("/", 2) + ["", ""])[:3]
        listing = _SAMPLES_LISTING.fullmatch(name)
        if listing is None or not _UID.fullmatch(token_uid):
            raise bad_page_token(token)
        named = listing[1], token_uid
    # ASCII digits only: int() also takes "+1", " 1", "1_0" and non-ASCII digits.
    if not (offset.isascii() and offset.isdigit() and len(offset) <= 19 and int(offset) <= _MAX_OFFSET):
        raise bad_page_token(token)
    return int(offset), limit, named


def require_token_of_set(token: str, named: tuple[str, str] | None, sample_set_id: str, uid: str) -> None:
    """InvalidArgument naming page_token unless ``token``, naming the set ``named`` (id,
    uid; None: none, see offset_page), pages the samples of set ``sample_set_id`` of
    ``uid``: one of another set, or of an earlier set of the id, deleted since, would page
    this one from its offset."""
    if named is None:
        return
    token_set, token_uid = named
    if token_set != sample_set_id:
        raise InvalidArgument(f"{token[:40]!r} is a page token of sample set {token_set!r}'s samples, not of {sample_set_id!r}'s: "
                              "page a set with the tokens of its own listing", field="page_token")
    if token_uid != uid:
        raise InvalidArgument(f"{token[:40]!r} is a page token of an earlier sample set {sample_set_id!r} (uid {token_uid}), deleted "
                              f"since and created again (uid {uid}): list its samples from the start, without a page_token",
                              field="page_token")


def offset_token(offset: int, *, sample_set_id: str, uid: str) -> str:
    """The token of the page starting at sample ``offset`` of the set ``sample_set_id`` of
    ``uid``, prefixed with its format's version: ``"3:samples[set=<id>]/<uid>/<offset>"``."""
    return f"{SAMPLES_PAGE_TOKEN_VERSION}:{listing_name('samples', set=sample_set_id)}/{uid}/{offset}"


def next_offset_token(offset: int, limit: int, returned: int, *, sample_set_id: str, uid: str) -> str:
    """The token of the page after a full one (``returned == limit``); "" after a short one, the last."""
    return offset_token(offset + limit, sample_set_id=sample_set_id, uid=uid) if returned == limit else ""


def resume_token(listing: str, create_time: float, item_id: str) -> str:
    """The token of ``listing`` (e.g. "operations") that resumes after the item created
    at ``create_time`` (s) with ``item_id``, prefixed with its format's version."""
    return f"{PAGE_TOKEN_VERSION}:{listing}/{create_time!r}/{item_id}"


def listing_name(listing: str, *, owner: str = "", **filters: str) -> str:
    """The name of ``listing`` (e.g. "operations") kept to the items of the named caller
    ``owner`` ("": everyone's) and to the non-empty ``filters`` (e.g. kind=...), for
    resume_token and resume_point: a token resumes only the listing its first page was
    asked for (AIP-158). An owner that is no caller name is InvalidArgument naming owner."""
    if owner and not CALLER_NAME.fullmatch(owner):
        raise InvalidArgument(f"{owner[:64]!r} is no caller name (it must match {CALLER_NAME.pattern}); \"\" lists everyone's",
                              field="owner")
    # Quoted: a value's "/", "," or "@" would otherwise cut the token in the wrong place.
    given = ",".join(f"{key}={quote(value, safe='')}" for key, value in filters.items() if value)
    return listing + (f"[{given}]" if given else "") + (f"@{owner}" if owner else "")


def _described(name: str) -> str:
    """A listing_name as words: "caller 'x''s operations with kind 'k'"."""
    rest, _, owner = name.partition("@")
    listing, _, given = rest.partition("[")
    conditions = [f"{key} {unquote(value)!r}" for key, _, value in (item.partition("=") for item in given.rstrip("]").split(",") if item)]
    return (f"caller {owner!r}'s " if owner else "everyone's ") + listing.replace("_", " ") + (
        f" with {' and '.join(conditions)}" if conditions else "")


def resume_point(token: str, listing: str) -> tuple[float, str] | None:
    """(create_time, id) of the last item of the previous page, from its token, which
    must be one of ``listing``'s (a listing_name: of the same owner and filters), of
    PAGE_TOKEN_VERSION or of version 1 (unprefixed)."""
    if not token:
        return None
    name, _, point = _token_body(token)[1].partition("/")
    create_time, _, item_id = point.partition("/")
    if name != listing and _LISTING_NAME.fullmatch(name) and name.partition("[")[0].partition("@")[0] == listing.partition("[")[0].partition("@")[0]:
        raise InvalidArgument(f"{token[:40]!r} is a page token of {_described(name)}, not of {_described(listing)}: "
                              "page with the owner and filters its first page was asked with", field="page_token")
    # As repr() writes a non-negative float; float() alone also takes " 5 ", "1_0", "-1e300", "١".
    if name != listing or not item_id or not _FLOAT_REPR.fullmatch(create_time) or not math.isfinite(resume := float(create_time)):
        raise bad_page_token(token)
    return resume, item_id


def messages_that_fit(messages: Iterable[_M], max_message_bytes: int) -> list[_M]:
    """The first of ``messages`` that one response can carry as a repeated field within
    ``max_message_bytes``; never none when there is one. A page ends there, early, rather
    than failing whole on the send limit (large images, large results). Reads at most
    one message past them, so a lazy iterable reads no more than it must."""
    budget, size, page = max_message_bytes - _RESPONSE_HEADROOM, 0, []
    for message in messages:
        size += message.ByteSize() + _FIELD_OVERHEAD
        if page and size > budget:
            break
        page.append(message)
    return page
