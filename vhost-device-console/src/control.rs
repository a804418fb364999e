//! Control messages of a MULTIPORT console (virtio 1.2, 5.3.6.2): `struct
//! virtio_console_control { le32 id; le16 event; le16 value; }`, followed for `PORT_NAME`
//! by the name and for `RESIZE` by `{ le16 rows; le16 cols; }`.
//!
//! The driver sends `DEVICE_READY`, `PORT_READY` and `PORT_OPEN`; the device sends
//! `DEVICE_ADD`, `CONSOLE_PORT`, `RESIZE`, `PORT_OPEN` and `PORT_NAME`. Anything else from
//! the driver is a guest fault: it is reported and ignored.

/// `VIRTIO_CONSOLE_DEVICE_READY`: the driver is ready (value 1) or failed (0).
pub const DEVICE_READY: u16 = 0;
/// `VIRTIO_CONSOLE_DEVICE_ADD`: a port was added (device to driver).
pub const DEVICE_ADD: u16 = 1;
/// `VIRTIO_CONSOLE_DEVICE_REMOVE`: a port was removed (device to driver).
pub const DEVICE_REMOVE: u16 = 2;
/// `VIRTIO_CONSOLE_PORT_READY`: the driver set a port up (value 1) or failed (0).
pub const PORT_READY: u16 = 3;
/// `VIRTIO_CONSOLE_CONSOLE_PORT`: this port is a console (device to driver).
pub const CONSOLE_PORT: u16 = 4;
/// `VIRTIO_CONSOLE_RESIZE`: a console port's size changed (device to driver).
pub const RESIZE: u16 = 5;
/// `VIRTIO_CONSOLE_PORT_OPEN`: one side opened (1) or closed (0) the port.
pub const PORT_OPEN: u16 = 6;
/// `VIRTIO_CONSOLE_PORT_NAME`: the port's name follows (device to driver).
pub const PORT_NAME: u16 = 7;

/// Size of the fixed header.
pub const HEADER_LEN: usize = 8;

/// A control message the driver sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverMessage {
    /// `DEVICE_READY` with its status.
    DeviceReady(bool),
    /// `PORT_READY` for a port id, with its status.
    PortReady(u32, bool),
    /// `PORT_OPEN` for a port id: the guest application opened or closed it.
    PortOpen(u32, bool),
}

/// Why a control message from the driver is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than the 8-byte header.
    #[error("control message of {0} bytes is shorter than its 8-byte header")]
    TooShort(usize),
    /// An event the driver may not send, or one the specification does not define.
    #[error("unknown or device-only control event {0}")]
    UnknownEvent(u16),
}

/// Parses a control message the driver sent. Trailing bytes are ignored (the spec defines
/// none for driver messages).
pub fn parse(bytes: &[u8]) -> Result<DriverMessage, ParseError> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(ParseError::TooShort(bytes.len()))?;
    let id = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let event = u16::from_le_bytes([header[4], header[5]]);
    let value = u16::from_le_bytes([header[6], header[7]]) != 0;
    match event {
        DEVICE_READY => Ok(DriverMessage::DeviceReady(value)),
        PORT_READY => Ok(DriverMessage::PortReady(id, value)),
        PORT_OPEN => Ok(DriverMessage::PortOpen(id, value)),
        other => Err(ParseError::UnknownEvent(other)),
    }
}

/// Encodes a device-to-driver message with an optional payload.
pub fn encode(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&event.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// `DEVICE_ADD` for `port`.
pub fn port_add(port: u32) -> Vec<u8> {
    encode(port, DEVICE_ADD, 0, &[])
}

/// `CONSOLE_PORT` for `port`.
pub fn console_port(port: u32) -> Vec<u8> {
    encode(port, CONSOLE_PORT, 1, &[])
}

/// `PORT_OPEN` for `port`: the host side is connected or not.
pub fn port_open(port: u32, open: bool) -> Vec<u8> {
    encode(port, PORT_OPEN, u16::from(open), &[])
}

/// `PORT_NAME` for `port` (Linux shows it as `/sys/class/virtio-ports/vportXpY/name` and
/// the `/dev/virtio-ports/NAME` link).
pub fn port_name(port: u32, name: &str) -> Vec<u8> {
    encode(port, PORT_NAME, 1, name.as_bytes())
}

/// `RESIZE` for a console `port`.
pub fn resize(port: u32, cols: u16, rows: u16) -> Vec<u8> {
    let mut size = [0u8; 4];
    size[..2].copy_from_slice(&rows.to_le_bytes());
    size[2..].copy_from_slice(&cols.to_le_bytes());
    encode(port, RESIZE, 0, &size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_driver_messages() {
        assert_eq!(
            parse(&encode(0, DEVICE_READY, 1, &[])),
            Ok(DriverMessage::DeviceReady(true))
        );
        assert_eq!(
            parse(&encode(3, PORT_READY, 0, &[])),
            Ok(DriverMessage::PortReady(3, false))
        );
        assert_eq!(
            parse(&encode(1, PORT_OPEN, 1, b"trailing")),
            Ok(DriverMessage::PortOpen(1, true))
        );
        // Any non-zero value is "true", as the Linux driver sends 1.
        assert_eq!(
            parse(&encode(1, PORT_OPEN, 0x100, &[])),
            Ok(DriverMessage::PortOpen(1, true))
        );
    }

    #[test]
    fn refuses_short_and_unknown_messages() {
        assert_eq!(parse(&[]), Err(ParseError::TooShort(0)));
        assert_eq!(parse(&[0; 7]), Err(ParseError::TooShort(7)));
        assert_eq!(
            parse(&encode(0, PORT_NAME, 1, b"x")),
            Err(ParseError::UnknownEvent(PORT_NAME))
        );
        assert_eq!(
            parse(&encode(0, 0xffff, 1, &[])),
            Err(ParseError::UnknownEvent(0xffff))
        );
    }

    #[test]
    fn encodes_device_messages_little_endian() {
        assert_eq!(port_add(2), vec![2, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(console_port(0), vec![0, 0, 0, 0, 4, 0, 1, 0]);
        assert_eq!(port_open(1, true), vec![1, 0, 0, 0, 6, 0, 1, 0]);
        assert_eq!(port_open(1, false), vec![1, 0, 0, 0, 6, 0, 0, 0]);
        assert_eq!(port_name(1, "ab"), vec![1, 0, 0, 0, 7, 0, 1, 0, b'a', b'b']);
        assert_eq!(
            resize(0, 132, 43),
            vec![0, 0, 0, 0, 5, 0, 0, 0, 43, 0, 132, 0]
        );
    }
}
