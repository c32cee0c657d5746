//! The listening sockets: one per shard, all on one address.
//!
//! SO_REUSEPORT contract: every socket bound to the same address and port with SO_REUSEPORT
//! set by the same user forms one group, and the kernel hashes each incoming connection (by
//! its 4-tuple) to one socket of the group. Each shard accepts only from its own socket, so no
//! accept is ever shared or contended. A socket that closes leaves the group; connections
//! already in its accept queue are reset, which is why a shard stops accepting only at
//! shutdown.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `n` listening sockets on `addr`. When `addr` has port 0, the first socket picks a
/// port and the others join it. Binding happens on the caller's thread so that "address in
/// use" is reported before any shard starts.
///
/// `recv_buffer` (bytes, 0 = leave the kernel's autotuning on) is set on the listening
/// sockets, and accepted connections inherit it. Bounding it is what makes backpressure
/// reach a station promptly: with autotuning a connection's receive buffer grows to
/// `net.ipv4.tcp_rmem`'s maximum (32 MiB on some hosts), so a stalled shard could sit behind
/// gigabytes of kernel-buffered lines, and stations would notice nothing for seconds.
pub(crate) fn bind_group(
    addr: SocketAddr,
    n: usize,
    backlog: u32,
    recv_buffer: usize,
) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let mut sockets = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n {
        let socket = bind_one(bound, backlog, recv_buffer)?;
        if bound.port() == 0 {
            bound = socket.local_addr()?.as_socket().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "listener has no inet address")
            })?;
        }
        sockets.push(socket);
    }
    Ok((sockets, bound))
}

fn bind_one(addr: SocketAddr, backlog: u32, recv_buffer: usize) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if recv_buffer > 0 {
        // Before listen(), so that the window scale negotiated with each peer fits it.
        socket.set_recv_buffer_size(recv_buffer)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_port_is_shared_by_the_group() {
        let (sockets, addr) = bind_group("127.0.0.1:0".parse().unwrap(), 3, 16, 0).unwrap();
        assert_ne!(addr.port(), 0);
        for s in &sockets {
            assert_eq!(s.local_addr().unwrap().as_socket().unwrap(), addr);
        }
    }

    #[test]
    fn accepted_connections_inherit_the_receive_buffer() {
        let (sockets, addr) = bind_group("127.0.0.1:0".parse().unwrap(), 1, 16, 64 << 10).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        sockets[0].set_nonblocking(false).unwrap();
        let (conn, _) = sockets[0].accept().unwrap();
        // Linux doubles the value for its bookkeeping.
        assert_eq!(conn.recv_buffer_size().unwrap(), 128 << 10);
    }

    #[test]
    fn address_in_use_is_reported() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_group(taken.local_addr().unwrap(), 1, 16, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
