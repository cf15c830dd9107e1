"""The DNS wire, read and built in bytes where the hot path needs it, with dnslib for the rest: the answers every
path shares (FORMERR, NOTIMP, SERVFAIL, a block, `resolver.arpa`, an upstream answer made the client's, a truncated
answer) and the small readers the front uses. Pure functions: no state, no I/O."""

from __future__ import annotations

import struct

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord, EDNSOption

from dns_resolver.fastpath import MAX_UDP_ANSWER, PlainQuery, read_plain_query
from dns_resolver.forwarding import OUR_OPT, UpstreamAnswer
from policy.model import BlockAnswer, DnsSettings

_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_."  # what a plain name is made of, in lower case
_TTL, _COUNT = struct.Struct("!I"), struct.Struct("!H")
EDE_OPTION = 15  # RFC 8914: Extended DNS Errors
BLOCK_SOA_NAME = "blocked.vigie.invalid."  # RFC 6761: a name that never resolves
# RFC 9462 §6.5: a forwarder answers these itself. Vigie designates no encrypted resolver: an empty answer.
RESOLVER_ARPA = "resolver.arpa"


def formerr_for(packet: bytes) -> bytes | None:
    """A FORMERR header echoing the query's ID, or None when not even a header can be read (then: silence)."""
    if len(packet) < 12:
        return None
    query_id, flags = struct.unpack("!HH", packet[:4])
    if flags & 0x8000:
        return None  # a response, not a query: never answer it (no reflection loops)
    return struct.pack("!HHHHHH", query_id, 0x8000 | (flags & 0x7900) | RCODE.FORMERR, 0, 0, 0, 0)


def question_bytes(name: str, qtype: int) -> bytes:
    """The question section for (name, type, class IN), lower-cased, as the forwarder keys it."""
    labels = b"".join(bytes((len(label),)) + label.encode("ascii") for label in name.lower().split(".") if label)
    return labels + b"\x00" + struct.pack("!HH", qtype, 1)


def plain_name(question: bytes) -> str | None:
    """`\x03www\x07example\x02fr\x00...` → `www.example.fr`, or None when a label is not a plain host label
    (letters, digits, `-`, `_`: the question is lower-cased already)."""
    labels, index = [], 0
    while question[index]:
        labels.append(question[index + 1:index + 1 + question[index]])
        index += question[index] + 1
    name = b".".join(labels)
    if not name or name.translate(None, _HOST_BYTES) or name.count(b".") != len(labels) - 1:
        return None  # another byte, or a dot inside a label
    return name.decode("ascii")


def client_reply(packet: bytes, query: PlainQuery, upstream: UpstreamAnswer, ttl_cap: int) -> bytes:
    """The upstream answer made the client's: its ID, RD bit and question case, TTLs capped, our EDNS record
    only if the client sent one (the forwarder already dropped the upstream's own)."""
    wire, start = upstream.wire, upstream.question_end
    records = wire[start:]
    capped: bytearray | None = None
    for offset in upstream.offsets:
        if _TTL.unpack_from(records, offset)[0] > ttl_cap:
            if capped is None:
                capped = bytearray(records)
            _TTL.pack_into(capped, offset, ttl_cap)
    if capped is not None:
        records = bytes(capped)
    additional = wire[10:12]
    if query.edns:
        records += OUR_OPT
        additional = _COUNT.pack((wire[10] << 8 | wire[11]) + 1)
    flags = ((wire[2] & 0xFA) | (packet[2] & 0x01), wire[3] & 0xDF | 0x80)  # no AA; the client's RD; no AD; RA
    return packet[:2] + bytes(flags) + packet[4:6] + wire[6:10] + additional + packet[12:query.question_end] + records


def servfail(packet: bytes, query: PlainQuery) -> bytes:
    flags = bytes((0x80 | (packet[2] & 0x01), 0x80 | RCODE.SERVFAIL))
    additional = b"\x00\x01" if query.edns else b"\x00\x00"
    return packet[:2] + flags + b"\x00\x01\x00\x00\x00\x00" + additional + packet[12:query.question_end] + \
        (OUR_OPT if query.edns else b"")


def min_ttl(record: DNSRecord) -> int:
    ttls = [rr.ttl for rr in (*record.rr, *record.auth)]
    return min(ttls) if ttls else 0


def reply_to(request: DNSRecord) -> DNSRecord:
    """An empty reply: RA, the client's RD, neither AA (dnslib sets it) nor AD."""
    reply = request.reply(ra=1, aa=0)
    reply.header.ad = 0  # dnslib copies the query's flags, and dig sets AD in its queries
    return reply


def rcode_reply(request: DNSRecord, rcode: int) -> DNSRecord:
    reply = reply_to(request)
    reply.header.rcode = rcode
    return reply


def header_reply(packet: bytes, rcode: int) -> bytes | None:
    """The query's header and question sent back with `rcode` (NOTIMP), no records; None for a response."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    query = read_plain_query(packet[:2] + bytes((packet[2] & 0x01, 0)) + packet[4:])  # its question, if plain
    question = packet[12:query.question_end] if query is not None else b""
    flags = bytes((0x80 | (packet[2] & 0x79), 0x80 | rcode))  # QR, the opcode and RD echoed, RA
    return packet[:2] + flags + struct.pack("!HHHH", 1 if question else 0, 0, 0, 0) + question


def with_edns(request: DNSRecord, reply: DNSRecord, *options: EDNSOption) -> DNSRecord:
    """Echo EDNS when the client used it (with our options, e.g. Extended DNS Errors); never add it otherwise."""
    if any(rr.rtype == QTYPE.OPT for rr in request.ar):
        reply.add_ar(EDNS0(udp_len=1232, opts=list(options)))
    return reply


def client_udp_size(packet: bytes) -> int:
    try:
        request = DNSRecord.parse(packet)
    except Exception:
        return 512
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, min(int(rr.rclass), MAX_UDP_ANSWER))
    return 512


def truncated(answer: bytes) -> bytes:
    """Header and question only, TC set: the client retries over TCP."""
    record = DNSRecord.parse(answer)
    record.rr, record.auth, record.ar = [], [], []
    record.header.tc = 1
    wire: bytes = record.pack()
    return wire


def block_answer(request: DNSRecord, settings: DnsSettings, serial: int, ttl: int, extended_error: int,
                 text: str) -> DNSRecord:
    """The block answer for the question, as `settings.block_answer` says (NXDOMAIN, a null address or the block
    page's), for `ttl` seconds, with the Extended DNS Error `extended_error` and `text` when the client sent EDNS."""
    question = request.questions[0]
    reply = reply_to(request)
    if settings.block_answer is BlockAnswer.NXDOMAIN:
        reply.header.rcode = RCODE.NXDOMAIN
    elif question.qtype == QTYPE.A:
        address = settings.blockpage_ipv4 if settings.block_answer is BlockAnswer.BLOCKPAGE else "0.0.0.0"
        if address:
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=ttl))
    elif question.qtype == QTYPE.AAAA:
        address = settings.blockpage_ipv6 if settings.block_answer is BlockAnswer.BLOCKPAGE else "::"
        if address:
            reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=ttl))
    if not reply.rr:
        # NXDOMAIN or no address: an SOA makes it cacheable (RFC 2308) for the block's TTL, which never outlasts
        # the decision; without one, clients would ask again at once.
        reply.add_auth(RR(question.qname, QTYPE.SOA, ttl=ttl, rdata=SOA(
            BLOCK_SOA_NAME, "hostmaster." + BLOCK_SOA_NAME, (serial % 2**32, 3600, 600, 86400, ttl))))
    return with_edns(request, reply, EDNSOption(EDE_OPTION, struct.pack("!H", extended_error) + text.encode()))


def resolver_arpa_answer(request: DNSRecord, qname: str) -> DNSRecord:
    """`resolver.arpa` and `_dns.resolver.arpa` exist and hold nothing (no designated encrypted resolver, RFC 9462):
    an authoritative empty answer; any other name below them does not exist."""
    reply = reply_to(request)
    reply.header.aa = 1
    if qname not in (RESOLVER_ARPA, "_dns." + RESOLVER_ARPA):
        reply.header.rcode = RCODE.NXDOMAIN
    return with_edns(request, reply)
