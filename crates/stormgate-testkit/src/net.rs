//! Connections from a chosen loopback source address (127.0.0.x), for tests and the load
//! generator that open more connections to one server address than one source address has
//! ephemeral ports.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// A TCP socket to `target`, bound to `source` (port 0) when given, with `setup` applied
/// before the bind and the connect (buffer sizes, `set_nonblocking`); the connect is
/// started, and on a nonblocking socket may still be in progress.
///
/// The port is picked at connect time (`IP_BIND_ADDRESS_NO_PORT`), per destination: a socket
/// bound to port 0 otherwise takes a port from the whole ephemeral range for every destination,
/// and 100,000 such connections in TIME_WAIT leave the next plain `connect` to 127.0.0.1 with
/// no port at all (EADDRNOTAVAIL).
pub fn connect_from(
    target: SocketAddr,
    source: Option<IpAddr>,
    setup: impl FnOnce(&Socket) -> io::Result<()>,
) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    setup(&socket)?;
    if let Some(source) = source {
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn connects_from_the_source_address_given() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
        let socket =
            connect_from(listener.local_addr().unwrap(), Some(source), |_| Ok(())).unwrap();
        let stream = TcpStream::from(socket);
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), source);
        assert_eq!(stream.local_addr().unwrap(), peer);
    }
}
