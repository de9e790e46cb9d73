//! Shared AWS set-up: one HTTPS client (rustls on ring, the stack object_store and reqwest
//! also use), credentials from the default chain (the ECS task role in Fargate), endpoints
//! from the standard `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_<SERVICE>` variables, a retry
//! policy for a worker that has nothing better to do than to try again ([`crate::retry`]'s
//! figures), and [`fault`]: an SDK error in [`crate::retry`]'s classification.

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use crate::retry::{self, Fault};

/// The SDK configuration every client of this process starts from.
pub async fn sdk_config(region: Option<&str>) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(retry::SDK_ATTEMPTS)
                .with_initial_backoff(retry::SDK.first)
                .with_max_backoff(retry::SDK.max),
        );
    if let Some(r) = region {
        loader = loader.region(Region::new(r.to_string()));
    }
    loader.load().await
}

/// The endpoint set for `service` (e.g. `S3`) by `AWS_ENDPOINT_URL_S3` or
/// `AWS_ENDPOINT_URL`: a local server in tests, a VPC endpoint or another S3 in production.
pub fn custom_endpoint(service: &str) -> Option<String> {
    [
        format!("AWS_ENDPOINT_URL_{service}"),
        "AWS_ENDPOINT_URL".into(),
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// An object_store client of `bucket` with the SDK's credentials (the default chain: the ECS
/// task role, profiles, SSO), region and endpoint (`AWS_ENDPOINT_URL_S3`): what `shardlake
/// query` reads an S3 lake through, and what the S3 source reads objects with.
#[cfg(feature = "pipeline")]
pub async fn s3_object_store(
    bucket: &str,
    region: Option<&str>,
    kms_key_id: Option<&str>,
) -> object_store::Result<object_store::aws::AmazonS3> {
    use object_store::aws::AmazonS3Builder;
    let conf = sdk_config(region).await;
    let mut b = AmazonS3Builder::new().with_bucket_name(bucket).with_region(
        conf.region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".into()),
    );
    if let Some(provider) = conf.credentials_provider() {
        b = b.with_credentials(std::sync::Arc::new(SdkCredentials(provider)));
    }
    if let Some(endpoint) = custom_endpoint("S3") {
        b = b
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .with_endpoint(endpoint);
    }
    // Objects it writes (Delta log entries, compacted files) are encrypted with the lake's
    // key, as the sink's own uploads are: a bucket policy requiring SSE-KMS accepts them.
    if let Some(key) = kms_key_id {
        b = b.with_sse_kms_encryption(key);
    }
    b.build()
}

/// object_store's view of the AWS SDK's credential chain, so that object_store clients use
/// the credentials the SDK clients do.
#[cfg(feature = "pipeline")]
#[derive(Debug)]
struct SdkCredentials(aws_sdk_s3::config::SharedCredentialsProvider);

#[cfg(feature = "pipeline")]
#[async_trait::async_trait]
impl object_store::CredentialProvider for SdkCredentials {
    type Credential = object_store::aws::AwsCredential;

    async fn get_credential(&self) -> object_store::Result<std::sync::Arc<Self::Credential>> {
        use aws_sdk_s3::config::ProvideCredentials;
        let c = self
            .0
            .provide_credentials()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(std::sync::Arc::new(object_store::aws::AwsCredential {
            key_id: c.access_key_id().to_string(),
            secret_key: c.secret_access_key().to_string(),
            token: c.session_token().map(str::to_string),
        }))
    }
}

/// An SDK error as [`crate::retry`] classifies it: by the service's error code and HTTP status;
/// no answer (a timeout, a lost connection, a response that did not parse) is transient; a
/// request that could not even be built is permanent.
pub fn fault<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Fault {
    match e {
        SdkError::ServiceError(s) => {
            retry::classify(s.err().code(), Some(s.raw().status().as_u16()))
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Fault::Transient
        }
        _ => Fault::Permanent,
    }
}

/// An SDK error with its causes (the SDK's own `Display` shows only "service error").
pub fn describe<E: std::error::Error>(e: &E) -> String {
    aws_sdk_kinesis::error::DisplayErrorContext(e).to_string()
}

/// Counts the faults the SDK retries on its own (throttling, 5xx, lost connections), so
/// that they show in the metrics like the Kinesis reader's own retries. Installed on the S3
/// and DynamoDB clients; the interceptor types are the runtime's, shared by every SDK crate.
#[cfg(feature = "pipeline")]
#[derive(Debug)]
pub struct FaultCounter {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    throttled: fn(&crate::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
    errors: fn(&crate::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
}

#[cfg(feature = "pipeline")]
impl FaultCounter {
    pub fn new(
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        throttled: fn(&crate::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
        errors: fn(&crate::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
    ) -> Self {
        Self {
            metrics,
            throttled,
            errors,
        }
    }
}

#[cfg(feature = "pipeline")]
impl aws_sdk_s3::config::Intercept for FaultCounter {
    fn name(&self) -> &'static str {
        "shardlake::FaultCounter"
    }

    fn read_after_attempt(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::FinalizerInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let m = &self.metrics;
        match ctx.response() {
            Some(r) => {
                let status = r.status().as_u16();
                let body = r.body().bytes().unwrap_or_default();
                let throttling = status == 429 || retry::body_names_throttling(body);
                if (400..600).contains(&status) && throttling {
                    crate::metrics::Metrics::add((self.throttled)(m), 1);
                } else if status >= 500 {
                    crate::metrics::Metrics::add((self.errors)(m), 1);
                }
            }
            // No answer: the connection failed or timed out.
            None if matches!(ctx.output_or_error(), Some(Err(_))) => {
                crate::metrics::Metrics::add((self.errors)(m), 1);
            }
            None => {}
        }
        Ok(())
    }
}
