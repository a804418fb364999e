//! The virtio-net device as the spec defines it (virtio 1.2, section 5.1): feature bits,
//! the configuration space, and the header in front of every packet.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The header in front of every packet once VERSION_1 or MRG_RXBUF is negotiated
/// (`struct virtio_net_hdr_v1`, with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// The legacy header without `num_buffers` (neither VERSION_1 nor MRG_RXBUF).
pub const LEGACY_HDR_LEN: usize = 10;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// An Ethernet header with one VLAN tag.
pub const ETH_HLEN_VLAN: usize = 18;
/// The largest frame a GSO packet may carry: a 64 KiB IP packet behind an Ethernet header.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN_VLAN;
/// The largest MTU the device accepts (jumbo frames up to 64 KiB).
pub const MAX_MTU: u16 = 65535 - 18;
/// The smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;

/// `virtio_net_hdr.gso_type` values.
pub mod gso {
    /// Not a GSO frame.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (never offered by this device).
    pub const UDP: u8 = 3;
    /// TCP over IPv6.
    pub const TCPV6: u8 = 4;
    /// The ECN bit ORed into the type.
    pub const ECN: u8 = 0x80;
}

/// `virtio_net_config.status`: the link is up.
pub const STATUS_LINK_UP: u16 = 1;

/// vhost-user's own feature bit (not a virtio one): the frontend may use protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The offloads a guest can use; each is passed through to the tap.
pub const OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN);

/// The virtio feature bits the device offers.
///
/// `CTRL_VQ` and `MQ` are offered only with several queue pairs. As with QEMU's and Cloud
/// Hypervisor's vhost-user-net, the control queue itself stays in the frontend: the backend
/// serves the data queues only (`num_queues` = 2 × pairs) and the frontend turns the guest's
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` into `VHOST_USER_SET_VRING_ENABLE` for the pairs.
pub fn device_features(queue_pairs: u16, mtu: Option<u16>) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | OFFLOAD_FEATURES
        | VHOST_USER_F_PROTOCOL_FEATURES;
    if queue_pairs > 1 {
        features |= bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
    }
    if mtu.is_some() {
        features |= bit(VIRTIO_NET_F_MTU);
    }
    features
}

/// What the acked feature bits mean for the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// The header length in front of every packet, both ways.
    pub hdr_len: usize,
    /// RX may spread one packet over several chains (`num_buffers`).
    pub mergeable: bool,
    /// The guest accepts partial checksums from the device.
    pub guest_csum: bool,
    /// The guest accepts TSO over IPv4 / IPv6, with ECN.
    pub guest_tso4: bool,
    /// See `guest_tso4`.
    pub guest_tso6: bool,
    /// See `guest_tso4`.
    pub guest_ecn: bool,
    /// The guest may send GSO frames (HOST_TSO4/6).
    pub host_tso: bool,
}

impl Negotiated {
    /// Interprets the acked feature bits.
    pub fn from_features(acked: u64) -> Self {
        let has = |b: u32| acked & bit(b) != 0;
        let mergeable = has(VIRTIO_NET_F_MRG_RXBUF);
        Negotiated {
            hdr_len: if has(VIRTIO_F_VERSION_1) || mergeable {
                HDR_LEN
            } else {
                LEGACY_HDR_LEN
            },
            mergeable,
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            guest_tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            guest_ecn: has(VIRTIO_NET_F_GUEST_ECN),
            host_tso: has(VIRTIO_NET_F_HOST_TSO4) || has(VIRTIO_NET_F_HOST_TSO6),
        }
    }

    /// The `TUNSETOFFLOAD` flags: what the tap may hand to the guest, exactly what it acked.
    /// The kernel needs checksum offload for any segmentation offload.
    pub fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.guest_csum {
            flags |= libc::TUN_F_CSUM;
            if self.guest_tso4 {
                flags |= libc::TUN_F_TSO4;
            }
            if self.guest_tso6 {
                flags |= libc::TUN_F_TSO6;
            }
            if self.guest_ecn && (self.guest_tso4 || self.guest_tso6) {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        flags
    }
}

/// `struct virtio_net_config` up to `mtu`, the fields this device fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfigSpace {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_LINK_UP`.
    pub status: u16,
    /// How many queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// The MTU advertised with `VIRTIO_NET_F_MTU` (0 otherwise).
    pub mtu: u16,
}

impl NetConfigSpace {
    /// The size of the fields above in the config space.
    pub const LEN: usize = 12;
    /// The most a frontend may read at once (vhost-user's `VHOST_USER_CONFIG_SIZE`).
    pub const MAX_READ: u32 = 256;

    /// The little-endian bytes of the config space.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// A read of `size` bytes at `offset`, as the frontend asked: what lies beyond the fields
    /// reads as zeros, and a read is never larger than [`Self::MAX_READ`].
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let size = size.min(Self::MAX_READ) as usize;
        let mut out = vec![0u8; size];
        let bytes = self.to_bytes();
        if let Some(src) = bytes.get(offset as usize..) {
            let n = src.len().min(size);
            out[..n].copy_from_slice(&src[..n]);
        }
        out
    }
}

/// The fields of a packet header the device looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `gso_type` with the ECN bit.
    pub gso_type: u8,
}

impl Header {
    /// Parses the first bytes of a header.
    pub fn parse(bytes: &[u8; LEGACY_HDR_LEN]) -> Self {
        Header { gso_type: bytes[1] }
    }

    /// Whether the frame asks for segmentation.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso::ECN != gso::NONE
    }

    /// Whether the GSO type is one the device offers (TCPv4/TCPv6, with or without ECN).
    pub fn gso_supported(&self) -> bool {
        matches!(
            self.gso_type & !gso::ECN,
            gso::NONE | gso::TCPV4 | gso::TCPV6
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_pairs_and_mtu() {
        let one = device_features(1, None);
        assert_eq!(one & bit(VIRTIO_NET_F_MQ), 0);
        assert_eq!(one & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        assert_eq!(one & bit(VIRTIO_NET_F_MTU), 0);
        assert_ne!(one & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        let two = device_features(2, Some(9000));
        assert_ne!(two & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(two & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        assert_ne!(two & bit(VIRTIO_NET_F_MTU), 0);
    }

    #[test]
    fn offloads_are_exactly_what_was_acked() {
        let all = Negotiated::from_features(device_features(1, None));
        assert_eq!(all.hdr_len, HDR_LEN);
        assert!(all.mergeable);
        assert_eq!(
            all.tap_offloads(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        let csum_only =
            Negotiated::from_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(csum_only.tap_offloads(), libc::TUN_F_CSUM);
        assert!(!csum_only.mergeable);
        // TSO without checksum offload is not something the tap can do: nothing is set.
        let tso_no_csum = Negotiated::from_features(bit(VIRTIO_NET_F_GUEST_TSO4));
        assert_eq!(tso_no_csum.tap_offloads(), 0);
        assert_eq!(tso_no_csum.hdr_len, LEGACY_HDR_LEN);
    }

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let cfg = NetConfigSpace {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: 2,
            mtu: 9000,
        };
        assert_eq!(cfg.read(0, 6), vec![0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(cfg.read(6, 2), vec![1, 0]);
        assert_eq!(cfg.read(8, 4), vec![2, 0, 0x28, 0x23]);
        assert_eq!(cfg.read(10, 8), vec![0x28, 0x23, 0, 0, 0, 0, 0, 0]);
        assert_eq!(cfg.read(100, 4), vec![0, 0, 0, 0]);
        assert_eq!(cfg.read(u32::MAX, u32::MAX).len(), 256);
    }

    #[test]
    fn header_gso_types() {
        let mut h = [0u8; LEGACY_HDR_LEN];
        assert!(!Header::parse(&h).is_gso());
        h[1] = gso::TCPV4 | gso::ECN;
        assert!(Header::parse(&h).is_gso());
        assert!(Header::parse(&h).gso_supported());
        h[1] = gso::UDP;
        assert!(!Header::parse(&h).gso_supported());
        h[1] = 0x7f;
        assert!(!Header::parse(&h).gso_supported());
    }
}
