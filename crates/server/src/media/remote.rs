//! Complete uploads on S3-compatible object storage (AWS S3, MinIO, Garage, Ceph…), so
//! several server nodes share one media store.
//!
//! Partial uploads stay on the local disk of the node that receives them (S3 objects are
//! written whole, and a client resumes chunk by chunk); once complete and fsynced there,
//! an upload is copied to the bucket before the uploader is told it is complete (its
//! message goes out next, and the recipient may fetch through another node), then its
//! local copy is deleted. Any node serves a fetch: from its disk while a failed copy is
//! retried, else from the bucket by byte range — also for uploads another node took. The bucket only ever holds
//! ciphertext; keys travel inside end-to-end encrypted messages.

use std::path::Path;
use std::time::Duration;

use s3::creds::Credentials;
use s3::{Bucket, Region};

use super::{hex, MediaError, MediaId};

/// Where the bucket is.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The service's URL: `https://s3.eu-central-1.amazonaws.com`, `http://127.0.0.1:9000`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Keys inside the bucket start with this (`media/` by default).
    pub prefix: String,
    /// From `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` unless given.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

impl RemoteConfig {
    pub fn new(endpoint: impl Into<String>, bucket: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            region: "us-east-1".into(),
            prefix: "media/".into(),
            access_key: None,
            secret_key: None,
        }
    }
}

/// The bucket, as the media store uses it.
pub(super) struct RemoteStore {
    bucket: Box<Bucket>,
    prefix: String,
    describe: String,
}

/// One request to the bucket may take this long (a whole upload of 100 MiB is many).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl RemoteStore {
    pub fn new(cfg: &RemoteConfig) -> Result<Self, MediaError> {
        let describe = format!("bucket {} at {}", cfg.bucket, cfg.endpoint);
        let bad = |what: String| MediaError::Remote(format!("{describe}: {what}"));
        let credentials = match (&cfg.access_key, &cfg.secret_key) {
            (Some(a), Some(s)) => Credentials::new(Some(a), Some(s), None, None, None),
            _ => Credentials::from_env(),
        }
        .map_err(|e| {
            bad(format!(
                "no credentials ({e}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ))
        })?;
        let region = Region::Custom {
            region: cfg.region.clone(),
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
        };
        // Path-style addressing (`endpoint/bucket/key`): what every S3-compatible service
        // takes, with no DNS name per bucket.
        let bucket = Bucket::new(&cfg.bucket, region, credentials)
            .map_err(|e| bad(e.to_string()))?
            .with_path_style()
            .with_request_timeout(REQUEST_TIMEOUT)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            bucket,
            prefix: cfg.prefix.clone(),
            describe,
        })
    }

    fn key(&self, id: &MediaId) -> String {
        format!("{}{}", self.prefix, hex(id))
    }

    fn error(&self, what: &str, e: s3::error::S3Error) -> MediaError {
        MediaError::Remote(format!("{} ({what}): {e}", self.describe))
    }

    /// Checks that the bucket answers and these credentials may use it: a missing object
    /// must come back as "not found", not as a refusal or no answer at all.
    pub async fn check(&self) -> Result<(), MediaError> {
        match self.bucket.head_object(self.key(&[0; 16])).await {
            Ok(_) => Ok(()),
            Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(e) => Err(self.error("checking the bucket", e)),
        }
    }

    /// Copies a complete upload's file into the bucket (a multipart upload for big ones).
    pub async fn put_file(&self, id: &MediaId, path: &Path) -> Result<(), MediaError> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|source| MediaError::Io {
                path: path.display().to_string(),
                source,
            })?;
        self.bucket
            .put_object_stream(&mut file, self.key(id))
            .await
            .map_err(|e| self.error("storing an upload", e))?;
        Ok(())
    }

    /// Up to `len` (> 0) bytes of an upload from `offset`, and the upload's size.
    pub async fn get_range(
        &self,
        id: &MediaId,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<u8>, u64), MediaError> {
        let end = offset + len.max(1) - 1;
        let answer = match self
            .bucket
            .get_object_range(self.key(id), offset, Some(end))
            .await
        {
            Ok(a) => a,
            Err(s3::error::S3Error::HttpFailWithBody(404, _)) => return Err(MediaError::NotFound),
            // A range starting at the end of the object.
            Err(s3::error::S3Error::HttpFailWithBody(416, _)) => {
                return Ok((Vec::new(), self.size(id).await?))
            }
            Err(e) => return Err(self.error("fetching an upload", e)),
        };
        // `Content-Range: bytes 0-99/1234`: the total after the slash.
        let size = answer
            .headers()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-range"))
            .and_then(|(_, v)| v.rsplit('/').next()?.trim().parse::<u64>().ok());
        let data = answer.to_vec();
        let size = match size {
            Some(s) => s,
            None => self.size(id).await?,
        };
        Ok((data, size))
    }

    async fn size(&self, id: &MediaId) -> Result<u64, MediaError> {
        match self.bucket.head_object(self.key(id)).await {
            Ok((head, _)) => head
                .content_length
                .and_then(|l| u64::try_from(l).ok())
                .ok_or_else(|| {
                    MediaError::Remote(format!("{}: an object without a length", self.describe))
                }),
            Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Err(MediaError::NotFound),
            Err(e) => Err(self.error("reading an upload's size", e)),
        }
    }

    pub async fn delete(&self, id: &MediaId) -> Result<(), MediaError> {
        match self.bucket.delete_object(self.key(id)).await {
            Ok(_) | Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(e) => Err(self.error("deleting an expired upload", e)),
        }
    }
}
