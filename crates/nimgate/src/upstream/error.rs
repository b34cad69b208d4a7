//! Why a backend's connection brought no answer, told apart by whether the backend can have
//! received the request: the retry loop's `AttemptError` is made from it.

/// Why a backend's client got no response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// No connection could be made: the backend received nothing.
    Connect(String),
    /// The request was (maybe partly) sent, and the exchange failed before a response head.
    Failed(String),
}

/// The innermost cause of an error: "Connection refused (os error 111)" rather than
/// "client error (Connect)".
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
