"""The one netlink message walker, on bytes crafted by hand: lengths that are not multiples of four, several
messages in one datagram, the kernel's errors and end-of-dump, a truncated tail, nested attributes.

The bytes are packed here with explicit padding, not with the module's own encoders, so an alignment
mistake cannot cancel itself out."""

from __future__ import annotations

import errno
import struct

from agent.node import netlink
from agent.node.netlink import Message, attribute, attribute_string, attributes, messages


def header(length: int, mtype: int, flags: int = 0, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", length, mtype, flags, seq, 0)


def test_messages_whose_length_is_not_a_multiple_of_four_are_followed_by_padding() -> None:
    first = header(16 + 5, 100, seq=7) + b"abcde" + b"\0\0\0"  # 21 bytes, padded to 24
    second = header(16 + 2, 101, flags=0x2, seq=8) + b"xy" + b"\0\0"  # 18 bytes, padded to 20
    third = header(16 + 4, 102, seq=9) + b"1234"  # aligned already, no padding
    assert list(messages(first + second + third)) == [
        Message(100, 0, 7, b"abcde"),
        Message(101, 0x2, 8, b"xy"),
        Message(102, 0, 9, b"1234"),
    ]


def test_the_last_message_needs_no_padding_after_it() -> None:
    data = header(16 + 4, 100) + b"1234" + header(16 + 1, 101) + b"z"
    assert [m.payload for m in messages(data)] == [b"1234", b"z"]


def test_an_error_carries_the_kernels_errno_and_an_acknowledgement_carries_none() -> None:
    request = header(16, 18, seq=3)  # struct nlmsgerr: the negated errno, then the request's header
    refused = header(16 + 4 + 16, netlink.NLMSG_ERROR, seq=3) + struct.pack("=i", -errno.ENODEV) + request
    ack = header(16 + 4 + 16, netlink.NLMSG_ERROR, seq=4) + struct.pack("=i", 0) + request
    found = list(messages(refused + ack))
    assert [(m.type, m.seq, m.error) for m in found] == [
        (netlink.NLMSG_ERROR, 3, errno.ENODEV),
        (netlink.NLMSG_ERROR, 4, 0),
    ]


def test_an_error_too_short_to_carry_a_code_is_not_an_acknowledgement() -> None:
    (short,) = messages(header(16 + 2, netlink.NLMSG_ERROR) + b"\0\0" + b"\0\0")
    assert short.error == errno.EBADMSG


def test_the_end_of_a_dump_is_a_message_like_any_other() -> None:
    reply = header(16 + 3, 20, flags=0x2, seq=5) + b"abc" + b"\0"
    done = header(16 + 4, netlink.NLMSG_DONE, flags=0x2, seq=5) + struct.pack("=i", 0)
    assert [(m.type, m.payload) for m in messages(reply + done)] == [(20, b"abc"), (3, b"\0\0\0\0")]


def test_a_truncated_tail_ends_the_walk_without_reading_past_the_data() -> None:
    whole = header(16 + 4, 100) + b"1234"
    assert [m.type for m in messages(whole + header(16 + 8, 101) + b"1234")] == [100]  # body cut short
    assert [m.type for m in messages(whole + header(16 + 8, 101)[:10])] == [100]  # header cut short
    assert list(messages(b"")) == []


def test_a_length_shorter_than_the_header_ends_the_walk_instead_of_looping() -> None:
    assert [m.type for m in messages(header(16, 100) + header(0, 101) + header(16, 102))] == [100]


def test_attributes_follow_a_fixed_header_and_skip_their_padding() -> None:
    fixed = b"\x0a\0\0\0\x07\0\0\0"  # e.g. struct ifaddrmsg: 8 bytes
    name = struct.pack("=HH", 4 + 6, 3) + b"eth0\0\0" + b"\0\0"  # 10 bytes, padded to 12
    flags = struct.pack("=HH", 4 + 4, 8) + struct.pack("=I", 0x80)
    one = struct.pack("=HH", 4 + 1, 9) + b"\x01" + b"\0\0\0"  # 5 bytes, padded to 8
    payload = fixed + name + flags + one
    assert list(attributes(payload, len(fixed))) == [
        (3, b"eth0\0\0"),
        (8, struct.pack("=I", 0x80)),
        (9, b"\x01"),
    ]
    assert attribute_string(payload, len(fixed), 3) == "eth0"
    assert attribute_string(payload, len(fixed), 4) is None


def test_nested_attributes_are_walked_inside_their_parent_and_lose_the_nested_flag() -> None:
    kind = struct.pack("=HH", 4 + 6, 1) + b"dummy\0" + b"\0\0"  # IFLA_INFO_KIND, 10 bytes padded to 12
    linkinfo = struct.pack("=HH", 4 + len(kind), 18 | 0x8000) + kind  # IFLA_LINKINFO | NLA_F_NESTED
    after = struct.pack("=HH", 4 + 4, 4) + struct.pack("=I", 1500)  # IFLA_MTU after the nest
    ((outer_type, nest), (mtu_type, mtu)) = list(attributes(linkinfo + after))
    assert (outer_type, mtu_type, mtu) == (18, 4, struct.pack("=I", 1500))
    assert attribute_string(nest, 0, 1) == "dummy"


def test_a_truncated_attribute_ends_the_walk() -> None:
    whole = struct.pack("=HH", 4 + 4, 1) + b"abcd"
    cut = struct.pack("=HH", 4 + 8, 2) + b"abcd"  # says 12 bytes, has 8
    assert list(attributes(whole + cut)) == [(1, b"abcd")]
    assert list(attributes(whole + struct.pack("=HH", 0, 2) + whole)) == [(1, b"abcd")]


def test_encoded_requests_and_attributes_walk_back_to_what_was_written() -> None:
    nested = attribute(18 | 0x8000, attribute(1, b"bridge"))
    # The inner attribute's length excludes its padding (4 + 6); the outer's includes it (4 + 12).
    assert struct.unpack_from("=HHH", nested) == (16, 18 | 0x8000, 10) and len(nested) == 16
    data = netlink.request(16, b"\0" * 16 + nested, seq=42, flags=0x4)
    assert len(data) == struct.unpack_from("=I", data)[0]
    ((message),) = messages(data)
    assert (message.type, message.flags, message.seq) == (16, netlink.NLM_F_REQUEST | 0x4, 42)
    ((atype, value),) = attributes(message.payload, 16)
    assert atype == 18 and attribute_string(value, 0, 1) == "bridge"
