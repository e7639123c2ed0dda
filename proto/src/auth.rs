//! The client side of API keys: every call carries `Authorization: Bearer <key>`.

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// A client-side interceptor adding `Authorization: Bearer <key>` (nothing without a key).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(<key>)" } else { "Bearer(none)" })
    }
}

impl Bearer {
    pub fn new(key: Option<&str>) -> Result<Bearer, String> {
        match key.map(str::trim).filter(|k| !k.is_empty()) {
            None => Ok(Bearer(None)),
            Some(k) => {
                let mut v: MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {k}").parse().map_err(|_| "the API key has characters a header cannot carry")?;
                v.set_sensitive(true);
                Ok(Bearer(Some(v)))
            }
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
