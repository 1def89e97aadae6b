"""Tests for mailedge/cli/decode.py: ``mailedge decode`` and the JSON it prints."""

from __future__ import annotations

import io
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailedge.cli import main
from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    InetAddress,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
)

SOURCE4 = InetAddress(ipaddress.IPv4Address("192.0.2.10"), 51234)
DESTINATION4 = InetAddress(ipaddress.IPv4Address("198.51.100.25"), 25)
SOURCE6 = InetAddress(ipaddress.IPv6Address("2001:db8::1"), 40000)
DESTINATION6 = InetAddress(ipaddress.IPv6Address("2001:db8::25"), 465)

# By hand: the v2 signature, PROXY over TCP4, a 12-byte address block:
# 192.0.2.10:51234 -> 198.51.100.25:25.
HAND_V2_HEX = (
    "0d0a0d0a000d0a515549540a"  # signature
    "21"  # version 2, PROXY
    "11"  # INET, STREAM
    "000c"  # 12 bytes follow
    "c000020a"  # 192.0.2.10
    "c6336419"  # 198.51.100.25
    "c822"  # 51234
    "0019"  # 25
)
HAND_V1 = b"PROXY TCP4 192.0.2.10 198.51.100.25 51234 25\r\n"


def run_decode(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    status = main(["decode", *argv])
    out = capsys.readouterr().out
    return status, json.loads(out)


def write(tmp_path: Path, data: bytes | str, name: str = "capture") -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data, encoding="ascii")
    else:
        path.write_bytes(data)
    return str(path)


def tlv_header() -> bytes:
    return encode_v2(
        Command.PROXY,
        SOURCE6,
        DESTINATION6,
        tlvs=[
            TLV(TLVType.ALPN, b"smtp"),
            TLV(TLVType.AUTHORITY, b"mail.example.com"),
            TLV(TLVType.UNIQUE_ID, bytes.fromhex("00ff10")),
            TLV(0xE1, b"\x00\x01binary"),
        ],
        ssl=SSLInfo(
            client=ClientFlags.SSL | ClientFlags.CERT_CONN,
            verify=0,
            version="TLSv1.3",
            cn="client.example.org",
            cipher="TLS_AES_256_GCM_SHA384",
        ),
        crc32c=True,
    )


# --- valid headers ---------------------------------------------------------------------------


def test_v1_from_hex_with_colons(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    hex_text = ":".join(f"{byte:02x}" for byte in HAND_V1)
    status, result = run_decode(capsys, write(tmp_path, hex_text + "\n"))
    assert status == 0
    assert result["valid"] is True
    assert result["input_format"] == "hex"
    assert result["version"] == 1
    assert result["command"] == "PROXY"
    assert result["family"] == "INET"
    assert result["transport"] == "STREAM"
    assert result["source"] == {"ip": "192.0.2.10", "port": 51234}
    assert result["destination"] == {"ip": "198.51.100.25", "port": 25}
    assert result["tlvs"] == []
    assert result["ssl"] is None
    assert result["crc32c_verified"] is False
    assert result["consumed"] == len(HAND_V1)
    assert result["trailing_bytes"] == {"count": 0, "first": ""}


def test_v1_tcp6_from_encoder_raw(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    header = encode_v1(SOURCE6, DESTINATION6)
    status, result = run_decode(capsys, "--raw", write(tmp_path, header))
    assert status == 0
    assert result["input_format"] == "raw"
    assert result["family"] == "INET6"
    assert result["source"] == {"ip": "2001:db8::1", "port": 40000}
    assert result["destination"] == {"ip": "2001:db8::25", "port": 465}


def test_hand_written_v2_hex_with_spaces_and_0x(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spaced = " ".join("0x" + HAND_V2_HEX[i : i + 2] for i in range(0, len(HAND_V2_HEX), 2))
    status, result = run_decode(capsys, write(tmp_path, spaced))
    assert status == 0
    assert result["version"] == 2
    assert result["source"] == {"ip": "192.0.2.10", "port": 51234}
    assert result["destination"] == {"ip": "198.51.100.25", "port": 25}
    assert result["consumed"] == 28


def test_v2_with_tlvs_ssl_and_crc_from_raw_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    header = tlv_header()
    status, result = run_decode(capsys, write(tmp_path, header))
    assert status == 0
    assert result["input_format"] == "raw"
    assert result["version"] == 2
    assert result["family"] == "INET6"
    assert result["source"] == {"ip": "2001:db8::1", "port": 40000}
    assert result["crc32c_verified"] is True
    assert result["alpn"] == "smtp"
    assert result["authority"] == "mail.example.com"
    assert result["unique_id"] == "00ff10"
    assert result["netns"] is None
    assert result["consumed"] == len(header)

    tlvs = result["tlvs"]
    assert isinstance(tlvs, list)
    by_name = {tlv["type_name"]: tlv for tlv in tlvs}
    assert {"ALPN", "AUTHORITY", "UNIQUE_ID", "SSL", "CRC32C", "CUSTOM"} <= set(by_name)
    assert by_name["ALPN"] == {
        "type": 1,
        "type_name": "ALPN",
        "length": 4,
        "value_hex": "736d7470",
        "value_text": "smtp",
    }
    assert by_name["CUSTOM"]["type"] == 0xE1
    assert by_name["CUSTOM"]["value_hex"] == "0001" + b"binary".hex()
    assert "value_text" not in by_name["CUSTOM"]
    assert "value_text" not in by_name["SSL"]

    ssl = result["ssl"]
    assert isinstance(ssl, dict)
    assert ssl["client"] == ["SSL", "CERT_CONN"]
    assert ssl["client_ssl"] is True
    assert ssl["cert_presented"] is True
    assert ssl["verify"] == 0
    assert ssl["verified"] is True
    assert ssl["version"] == "TLSv1.3"
    assert ssl["cn"] == "client.example.org"
    assert ssl["cipher"] == "TLS_AES_256_GCM_SHA384"
    assert ssl["sig_alg"] is None
    assert ssl["client_cert"] is None
    sub_names = [sub["type_name"] for sub in ssl["tlvs"]]
    assert sub_names == ["VERSION", "CN", "CIPHER"]


def test_trailing_bytes_are_counted_and_escaped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = HAND_V1 + b"EHLO client.example.org\r\n\x00"
    status, result = run_decode(capsys, "--raw", write(tmp_path, data))
    assert status == 0
    assert result["consumed"] == len(HAND_V1)
    assert result["trailing_bytes"] == {
        "count": 26,
        "first": "EHLO client.example.org\\r\\n\\x00",
    }


def test_v2_trailing_tls_bytes_in_hex(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, result = run_decode(capsys, "--hex", write(tmp_path, HAND_V2_HEX + "160301"))
    assert status == 0
    assert result["consumed"] == 28
    assert result["trailing_bytes"] == {"count": 3, "first": "\\x16\\x03\\x01"}


# --- hex dumps -------------------------------------------------------------------------------


def test_tcpdump_x_dump_with_search(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # What tcpdump -X prints for one packet: 20 bytes of IPv4 header, 20 of TCP header, then
    # the payload; "--search" skips to the PROXY signature.
    packet = bytes(40) + HAND_V1
    lines = []
    for offset in range(0, len(packet), 16):
        chunk = packet[offset : offset + 16]
        groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"\t0x{offset:04x}:  {groups:<39}  {text}")
    status, result = run_decode(capsys, "--search", write(tmp_path, "\n".join(lines) + "\n"))
    assert status == 0
    assert result["input_format"] == "hex"
    assert result["skipped_bytes"] == 40
    assert result["source"] == {"ip": "192.0.2.10", "port": 51234}


# Captured on this project's loopback with `tcpdump -i lo -nn -X -c 1 'tcp dst port 2525 and
# (tcp[tcpflags] & tcp-push != 0)'` while a client sent an encode_v2 header (ALPN, AUTHORITY,
# SSL, CRC32C) and "EHLO client.example.org\r\n" in one segment.
TCPDUMP_X = (
    "10:56:52.927117 IP 127.0.0.1.57196 > 127.0.0.1.2525: Flags [P.], seq 2792826463:2792826590, "
    "ack 2759427452, win 64, options [nop,nop,TS val 2424068417 ecr 1565437701], length 127\n"
    "\t0x0000:  4500 00b3 cd6b 4000 4006 6ed7 7f00 0001  E....k@.@.n.....\n"
    "\t0x0010:  7f00 0001 df6c 09dd a677 265f a479 857c  .....l...w&_.y.|\n"
    "\t0x0020:  8018 0040 fea7 0000 0101 080a 907c 5941  ...@.........|YA\n"
    "\t0x0030:  5d4e af05 0d0a 0d0a 000d 0a51 5549 540a  ]N.........QUIT.\n"
    "\t0x0040:  2111 0056 cb00 7107 c000 0219 9d78 0019  !..V..q......x..\n"
    "\t0x0050:  0100 0473 6d74 7002 000e 6d78 2e65 7861  ...smtp...mx.exa\n"
    "\t0x0060:  6d70 6c65 2e63 6f6d 2000 2801 0000 0000  mple.com..(.....\n"
    "\t0x0070:  2100 0754 4c53 7631 2e33 2300 1654 4c53  !..TLSv1.3#..TLS\n"
    "\t0x0080:  5f41 4553 5f31 3238 5f47 434d 5f53 4841  _AES_128_GCM_SHA\n"
    "\t0x0090:  3235 3603 0004 5ca4 1c90 4548 4c4f 2063  256...\\...EHLO.c\n"
    "\t0x00a0:  6c69 656e 742e 6578 616d 706c 652e 6f72  lient.example.or\n"
    "\t0x00b0:  670d 0a                                  g..\n"
)


def test_real_tcpdump_capture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, TCPDUMP_X)
    status, result = run_decode(capsys, path)
    assert status == 1
    assert result["reason"] == "not_proxy_header"
    assert "--search" in str(result["hint"])

    status, result = run_decode(capsys, "--search", path)
    assert status == 0
    assert result["skipped_bytes"] == 52  # 20 bytes of IPv4 header, 32 of TCP header
    assert result["source"] == {"ip": "203.0.113.7", "port": 40312}
    assert result["destination"] == {"ip": "192.0.2.25", "port": 25}
    assert result["authority"] == "mx.example.com"
    assert result["crc32c_verified"] is True
    assert result["trailing_bytes"] == {"count": 25, "first": "EHLO client.example.org\\r\\n"}


def test_a_second_packet_in_a_dump_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["decode", write(tmp_path, TCPDUMP_X + TCPDUMP_X)]) == 2
    assert "second packet" in capsys.readouterr().err


def test_auto_detect_treats_text_that_is_not_hex_as_raw(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, result = run_decode(capsys, write(tmp_path, HAND_V1))
    assert status == 0
    assert result["input_format"] == "raw"
    assert result["version"] == 1


# --- invalid and incomplete ------------------------------------------------------------------


def test_invalid_port_has_a_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = b"PROXY TCP4 192.0.2.10 198.51.100.25 8_0 25\r\n"
    status, result = run_decode(capsys, write(tmp_path, data))
    assert status == 1
    assert result["valid"] is False
    assert result["reason"] == "bad_port"
    assert isinstance(result["message"], str)
    assert result["message"]


def test_crc_mismatch_is_invalid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    header = bytearray(encode_v2(Command.PROXY, SOURCE4, DESTINATION4, crc32c=True))
    header[-1] ^= 0xFF  # the CRC32C TLV is the only TLV, so its value ends the header
    status, result = run_decode(capsys, write(tmp_path, bytes(header)))
    assert status == 1
    assert result == {
        "valid": False,
        "reason": "crc_mismatch",
        "message": result["message"],
        "input_format": "raw",
        "input_length": len(header),
    }


def test_tls_instead_of_a_header_gets_a_hint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, result = run_decode(capsys, "--hex", write(tmp_path, "16 03 01 02 00 01 00 01 fc 03"))
    assert status == 1
    assert result["reason"] == "not_proxy_header"
    assert "TLS" in str(result["hint"])


def test_truncated_v2_says_how_many_bytes_are_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, result = run_decode(capsys, write(tmp_path, HAND_V2_HEX[:-8]))
    assert status == 1
    assert result["valid"] is False
    assert result["reason"] == "incomplete"
    assert result["message"] == "need 4 more bytes"
    assert result["bytes_needed"] == 4


def test_truncated_v1_is_incomplete(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, result = run_decode(capsys, "--raw", write(tmp_path, HAND_V1[:20]))
    assert status == 1
    assert result["reason"] == "incomplete"
    assert result["message"] == "the input ends before the header is complete"


def test_policy_options_are_passed_to_the_parser(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mixed = write(tmp_path, b"PROXY TCP6 192.0.2.10 198.51.100.25 51234 25\r\n")
    status, result = run_decode(capsys, mixed)
    assert status == 1
    assert result["reason"] == "family_not_allowed"
    assert "--allow-v1-mixed-family" in str(result["hint"])
    status, result = run_decode(capsys, "--allow-v1-mixed-family", mixed)
    assert status == 0
    assert result["source"] == {"ip": "192.0.2.10", "port": 51234}


# --- usage errors ----------------------------------------------------------------------------


def test_forced_hex_that_is_not_hex_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["decode", "--hex", write(tmp_path, HAND_V1)]) == 2
    assert "not hex" in capsys.readouterr().err


def test_missing_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["decode", str(tmp_path / "absent")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["decode", "--hex", "--raw"],
        ["decode", "--max-v2-length", "8"],
        ["decode", "--no-such-option"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    capsys.readouterr()


# --- standard input --------------------------------------------------------------------------


def test_stdin_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(HAND_V2_HEX.encode())))
    status, result = run_decode(capsys, "--compact")
    assert status == 0
    assert result["source"] == {"ip": "192.0.2.10", "port": 51234}


def test_stdin_via_subprocess() -> None:
    header = encode_v2(Command.PROXY, SOURCE4, DESTINATION4, crc32c=True)
    completed = subprocess.run(
        [sys.executable, "-m", "mailedge.cli", "decode", "-"],
        input=header.hex(" ", 2).encode() + b"\n",
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["valid"] is True
    assert result["crc32c_verified"] is True
    assert result["source"] == {"ip": "192.0.2.10", "port": 51234}
