//! Opening the byte stream that the Noise channel runs over.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::connection::BoxStream;
use crate::ClientError;

/// Opens a TCP connection to `address` (`host:port`) within `timeout`.
pub async fn connect_direct(address: &str, timeout: Duration) -> Result<BoxStream, ClientError> {
    let unreachable = |error| ClientError::Unreachable {
        address: address.to_string(),
        error,
    };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ))
        })?
        .map_err(unreachable)?;
    let _ = stream.set_nodelay(true);
    Ok(Box::new(stream))
}
