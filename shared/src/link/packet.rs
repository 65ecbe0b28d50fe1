//! IPv4, UDP and ICMP echo inside the tunnel, built and parsed by hand.
//!
//! boringtun only carries IP packets, and we have no TUN device: application
//! messages are wrapped in IPv4+UDP headers here, and the packets a peer sends
//! (UDP to us, ICMP echo from `ping`) are parsed here. Everything arriving is
//! untrusted until parsed: the parser checks every length and checksum and
//! never panics (a fuzz target holds it to that).

use std::net::Ipv4Addr;

/// IPv4 header length without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;
/// Largest UDP payload we build (keeps the inner packet under a 1420 MTU,
/// the usual WireGuard interface MTU).
pub const MAX_UDP_PAYLOAD: usize = 1420 - IPV4_HEADER_LEN - UDP_HEADER_LEN;

const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const DEFAULT_TTL: u8 = 64;

/// Why an inner packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet shorter than its headers")]
    TooShort,
    #[error("not an IPv4 packet")]
    NotIpv4,
    #[error("IPv4 header checksum is wrong")]
    BadHeaderChecksum,
    #[error("length fields disagree with the packet size")]
    BadLength,
    #[error("fragments are not supported")]
    Fragment,
    #[error("packet is not addressed to our virtual IP")]
    NotForUs,
    #[error("IP protocol {0} is not served")]
    UnsupportedProtocol(u8),
    #[error("UDP checksum is wrong")]
    BadUdpChecksum,
    #[error("ICMP checksum is wrong")]
    BadIcmpChecksum,
    #[error("ICMP type {0} is not served (only echo request)")]
    UnsupportedIcmp(u8),
    #[error("payload of {0} bytes is larger than {MAX_UDP_PAYLOAD}")]
    PayloadTooLarge(usize),
}

impl PacketError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PacketError::TooShort => "too_short",
            PacketError::NotIpv4 => "not_ipv4",
            PacketError::BadHeaderChecksum => "bad_header_checksum",
            PacketError::BadLength => "bad_length",
            PacketError::Fragment => "fragment",
            PacketError::NotForUs => "not_for_us",
            PacketError::UnsupportedProtocol(_) => "unsupported_protocol",
            PacketError::BadUdpChecksum => "bad_udp_checksum",
            PacketError::BadIcmpChecksum => "bad_icmp_checksum",
            PacketError::UnsupportedIcmp(_) => "unsupported_icmp",
            PacketError::PayloadTooLarge(_) => "payload_too_large",
        }
    }
}

/// An inner packet addressed to us, borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inner<'a> {
    Udp {
        src: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    /// An ICMP echo request; `icmp` is the whole ICMP message.
    EchoRequest { src: Ipv4Addr, icmp: &'a [u8] },
}

/// Internet checksum (RFC 1071) over several slices, as if concatenated.
/// Every slice but the last must have even length.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        }
        if let [last] = chunks.remainder() {
            sum = sum.wrapping_add(u32::from(*last) << 8);
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, udp_len: u16) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = PROTO_UDP;
    p[10..12].copy_from_slice(&udp_len.to_be_bytes());
    p
}

fn write_ipv4_header(
    out: &mut Vec<u8>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload_len: usize,
    id: u16,
) {
    let total = (IPV4_HEADER_LEN + payload_len) as u16;
    let start = out.len();
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    out.extend_from_slice(&[DEFAULT_TTL, proto, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let sum = checksum(&[&out[start..start + IPV4_HEADER_LEN]]);
    out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Builds an IPv4+UDP packet carrying `payload`.
pub fn build_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
    id: u16,
) -> Result<Vec<u8>, PacketError> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return Err(PacketError::PayloadTooLarge(payload.len()));
    }
    let udp_len = (UDP_HEADER_LEN + payload.len()) as u16;
    let mut out = Vec::with_capacity(IPV4_HEADER_LEN + usize::from(udp_len));
    write_ipv4_header(&mut out, src, dst, PROTO_UDP, usize::from(udp_len), id);
    let mut udp = [0u8; UDP_HEADER_LEN];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    let pseudo = udp_pseudo_header(src, dst, udp_len);
    let mut sum = checksum(&[&pseudo, &udp, payload]);
    if sum == 0 {
        sum = 0xffff; // zero means "no checksum" in UDP
    }
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&udp);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Builds the echo reply to an echo request `icmp` message received from `peer`.
pub fn build_echo_reply(ours: Ipv4Addr, peer: Ipv4Addr, icmp: &[u8], id: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(IPV4_HEADER_LEN + icmp.len());
    write_ipv4_header(&mut out, ours, peer, PROTO_ICMP, icmp.len(), id);
    let start = out.len();
    out.extend_from_slice(icmp);
    out[start] = ICMP_ECHO_REPLY;
    out[start + 1] = 0;
    out[start + 2] = 0;
    out[start + 3] = 0;
    let sum = checksum(&[&out[start..]]);
    out[start + 2..start + 4].copy_from_slice(&sum.to_be_bytes());
    out
}

/// Parses a decrypted inner packet addressed to `ours`.
pub fn parse(packet: &[u8], ours: Ipv4Addr) -> Result<Inner<'_>, PacketError> {
    if packet.len() < IPV4_HEADER_LEN {
        return Err(PacketError::TooShort);
    }
    if packet[0] >> 4 != 4 {
        return Err(PacketError::NotIpv4);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if ihl < IPV4_HEADER_LEN || total < ihl || total > packet.len() {
        return Err(PacketError::BadLength);
    }
    if checksum(&[&packet[..ihl]]) != 0 {
        return Err(PacketError::BadHeaderChecksum);
    }
    let flags_frag = u16::from_be_bytes([packet[6], packet[7]]);
    if flags_frag & 0x2000 != 0 || flags_frag & 0x1fff != 0 {
        return Err(PacketError::Fragment);
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if dst != ours {
        return Err(PacketError::NotForUs);
    }
    let body = &packet[ihl..total];
    match packet[9] {
        PROTO_UDP => {
            if body.len() < UDP_HEADER_LEN {
                return Err(PacketError::TooShort);
            }
            let udp_len = usize::from(u16::from_be_bytes([body[4], body[5]]));
            if udp_len < UDP_HEADER_LEN || udp_len > body.len() {
                return Err(PacketError::BadLength);
            }
            let udp = &body[..udp_len];
            let wire_sum = u16::from_be_bytes([udp[6], udp[7]]);
            if wire_sum != 0 {
                let pseudo = udp_pseudo_header(src, dst, udp_len as u16);
                if checksum(&[&pseudo, udp]) != 0 {
                    return Err(PacketError::BadUdpChecksum);
                }
            }
            Ok(Inner::Udp {
                src,
                src_port: u16::from_be_bytes([udp[0], udp[1]]),
                dst_port: u16::from_be_bytes([udp[2], udp[3]]),
                payload: &udp[UDP_HEADER_LEN..],
            })
        }
        PROTO_ICMP => {
            if body.len() < 8 {
                return Err(PacketError::TooShort);
            }
            if checksum(&[body]) != 0 {
                return Err(PacketError::BadIcmpChecksum);
            }
            if body[0] != ICMP_ECHO_REQUEST || body[1] != 0 {
                return Err(PacketError::UnsupportedIcmp(body[0]));
            }
            Ok(Inner::EchoRequest { src, icmp: body })
        }
        other => Err(PacketError::UnsupportedProtocol(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);

    #[test]
    fn udp_round_trips_with_valid_checksums() {
        for len in [0usize, 1, 2, 3, 100, MAX_UDP_PAYLOAD] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let pkt = build_udp(B, A, 4000, 5000, &payload, 7).expect("fits");
            assert_eq!(checksum(&[&pkt[..IPV4_HEADER_LEN]]), 0, "header checksum");
            let parsed = parse(&pkt, A).expect("parses");
            assert_eq!(
                parsed,
                Inner::Udp {
                    src: B,
                    src_port: 4000,
                    dst_port: 5000,
                    payload: &payload
                }
            );
        }
    }

    #[test]
    fn known_udp_checksum_matches_a_reference_packet() {
        // Reference computed independently: 10.214.0.2:4000 -> 10.214.0.1:5000 "hi".
        let pkt = build_udp(B, A, 4000, 5000, b"hi", 0).expect("fits");
        let pseudo = udp_pseudo_header(B, A, 10);
        assert_eq!(checksum(&[&pseudo, &pkt[IPV4_HEADER_LEN..]]), 0);
        assert_ne!(&pkt[26..28], &[0, 0]);
    }

    #[test]
    fn echo_reply_is_a_valid_answer_to_a_request() {
        let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"abcdefgh");
        let sum = checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut req = Vec::new();
        write_ipv4_header(&mut req, B, A, PROTO_ICMP, icmp.len(), 1);
        req.extend_from_slice(&icmp);
        let Ok(Inner::EchoRequest { src, icmp: got }) = parse(&req, A) else {
            panic!("echo request not recognised");
        };
        assert_eq!(src, B);
        let reply = build_echo_reply(A, src, got, 2);
        assert_eq!(checksum(&[&reply[..IPV4_HEADER_LEN]]), 0);
        let body = &reply[IPV4_HEADER_LEN..];
        assert_eq!(body[0], ICMP_ECHO_REPLY);
        assert_eq!(checksum(&[body]), 0);
        assert_eq!(&body[4..], &icmp[4..], "id, sequence and data echoed");
        assert_eq!(&reply[12..16], &A.octets());
        assert_eq!(&reply[16..20], &B.octets());
    }

    #[test]
    fn refuses_damaged_packets_with_a_reason() {
        let good = build_udp(B, A, 1, 2, b"payload", 0).expect("fits");
        let mut cases: Vec<(Vec<u8>, PacketError)> = Vec::new();
        cases.push((good[..10].to_vec(), PacketError::TooShort));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        cases.push((v6, PacketError::NotIpv4));
        let mut bad_sum = good.clone();
        bad_sum[10] ^= 0xff;
        cases.push((bad_sum, PacketError::BadHeaderChecksum));
        let mut long = good.clone();
        long[3] = long[3].wrapping_add(5);
        cases.push((long, PacketError::BadLength));
        let mut payload_flip = good.clone();
        let last = payload_flip.len() - 1;
        payload_flip[last] ^= 1;
        cases.push((payload_flip, PacketError::BadUdpChecksum));
        cases.push((
            build_udp(B, B, 1, 2, b"x", 0).expect("fits"),
            PacketError::NotForUs,
        ));
        for (pkt, want) in cases {
            assert_eq!(parse(&pkt, A), Err(want));
        }
        assert_eq!(
            build_udp(A, B, 1, 2, &vec![0; MAX_UDP_PAYLOAD + 1], 0),
            Err(PacketError::PayloadTooLarge(MAX_UDP_PAYLOAD + 1))
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&bytes, A);
        }
    }
}
