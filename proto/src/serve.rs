//! What every gRPC server of Gantry (the controller, a worker) serves the same way: server
//! reflection in both of its versions, and connections with Nagle's algorithm off.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_reflection::server::{Builder, Error, v1, v1alpha};

/// A reflection builder knowing `gantry.v1` and the standard health service.
fn reflection() -> Builder<'static> {
    Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// `grpc.reflection.v1.ServerReflection`: grpcurl, Postman and newer clients.
pub fn reflection_v1() -> Result<v1::ServerReflectionServer<impl v1::ServerReflection>, Error> {
    reflection().build_v1()
}

/// `grpc.reflection.v1alpha.ServerReflection`: the version the official Python
/// `grpcio-reflection` client, older grpcurl builds and many GUI clients speak.
pub fn reflection_v1alpha() -> Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, Error> {
    reflection().build_v1alpha()
}

/// The connections a listener accepts, with Nagle's algorithm off: a token is a few dozen
/// bytes, and without this a stream's small writes wait for the peer's delayed ACK (tens of
/// milliseconds per token). tonic's own `tcp_nodelay` applies only to addresses it binds.
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Send + 'static {
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    })
}

/// Binds a listener, saying which flag to change when the address is taken.
pub async fn bind(addr: &str, flag: &str) -> Result<(TcpListener, std::net::SocketAddr), String> {
    let l = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr} ({flag}): {e}"))?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    Ok((l, a))
}
