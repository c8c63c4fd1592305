//! The admin API: HTTP/1.1 + JSON on the server's Unix socket (see `docs/admin-api.md`).
//! Handlers are thin: they parse, call a [`Site`] method, and map its error to a status.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{Site, SiteError};
use dpsync_api::{
    ActionReport, AddPackage, AddTarget, BackupProgress, BackupReport, BackupRequest, DeleteReport, DistributeReport,
    DistributeRequest, ErrorBody, GcReport, PackageDetail, PackageInfo, RefreshReport, RefreshRequest, RemoveTarget,
    RetryReport, RetryRequest, RollbackReport, SetPackage, SetTarget, SetTargetReport, SiteInfo, StatusReport,
    TargetDetail, TargetInfo, TargetRemoval, TargetRequest, ValidateReport, VersionInfo,
};
use dpsync_store::Action;

pub fn router(site: Arc<Site>) -> Router {
    Router::new()
        .route("/v1/site", get(site_info))
        .route("/metrics", get(metrics))
        .route("/v1/packages", get(list_packages).post(add_package))
        .route("/v1/packages/{pkg}", get(show_package).patch(set_package).delete(delete_package))
        .route("/v1/packages/{pkg}/refresh", post(refresh))
        .route("/v1/gc", post(gc))
        .route("/v1/backup", get(backup_progress).post(backup))
        .route("/v1/targets", get(list_targets).post(add_target))
        .route("/v1/targets/{name}", get(show_target).post(set_target))
        .route("/v1/targets/{name}/remove", post(remove_target))
        .route("/v1/status", get(status_all))
        .route("/v1/packages/{pkg}/status", get(status))
        .route("/v1/packages/{pkg}/distribute", post(distribute))
        .route("/v1/packages/{pkg}/redistribute", post(redistribute))
        .route("/v1/packages/{pkg}/remove", post(remove))
        .route("/v1/packages/{pkg}/rollback", post(rollback))
        .route("/v1/packages/{pkg}/export", post(export))
        .route("/v1/packages/{pkg}/validate", post(validate))
        .route("/v1/packages/{pkg}/retry", post(retry))
        .with_state(site)
}

impl IntoResponse for SiteError {
    fn into_response(self) -> Response {
        let status = match &self {
            SiteError::NotFound(_) => StatusCode::NOT_FOUND,
            SiteError::Conflict(_) => StatusCode::CONFLICT,
            SiteError::Invalid(_) => StatusCode::BAD_REQUEST,
            SiteError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SiteError::Internal(e) => {
                tracing::error!("{e:#}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(ErrorBody { error: self.to_string(), hint: None })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, SiteError>;

/// Only `/metrics`, for `--metrics-listen` (a TCP port Prometheus can scrape).
pub fn metrics_router(site: Arc<Site>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(site)
}

async fn metrics(State(site): State<Arc<Site>>) -> Result<impl IntoResponse, SiteError> {
    let text = site.metrics_text().await?;
    Ok(([(axum::http::header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text))
}

async fn site_info(State(site): State<Arc<Site>>) -> ApiResult<SiteInfo> {
    Ok(Json(SiteInfo {
        site_code: site.cfg.site_code.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        data_dir: site.cfg.data_dir.display().to_string(),
        database: site.store.backend().as_str().into(),
        packages: site.store.packages().await?.len() as u64,
        site_key: site.site_key.public_hex(),
        node: site.cfg.node.clone(),
        library: site.cfg.library_dir.display().to_string(),
        nodes: site.node_infos().await?,
    }))
}

async fn package_info(site: &Site, p: dpsync_store::Package) -> Result<PackageInfo, SiteError> {
    let root = if p.current_version > 0 {
        site.store.versions(&p.id).await?.into_iter().next_back().map(|v| v.content_root.to_hex())
    } else {
        None
    };
    Ok(PackageInfo {
        id: p.id,
        name: p.name,
        source_path: p.source_path,
        source_site: p.source_site,
        source_version: p.current_version,
        content_root: root,
        created_at: p.created_at,
        state: if p.deleting_since.is_some() { "deleting" } else { "active" }.into(),
        priority: p.priority.as_str().into(),
        refresh_every_ms: p.refresh_every_ms,
        next_refresh_at: p.next_refresh_at,
        schedule_error: p.schedule_error,
    })
}

async fn list_packages(State(site): State<Arc<Site>>) -> ApiResult<Vec<PackageInfo>> {
    let mut out = Vec::new();
    for p in site.store.packages().await? {
        out.push(package_info(&site, p).await?);
    }
    Ok(Json(out))
}

async fn add_package(State(site): State<Arc<Site>>, Json(req): Json<AddPackage>) -> ApiResult<PackageInfo> {
    let name = crate::lifecycle::check_package_name(&req.name)?;
    site.check_source_folder(&req.source)?;
    let p = site.store.create_package(&site.cfg.site_code, name, &req.source).await?;
    tracing::info!(package = %p.id, name = %p.name, source = %req.source, "package added");
    Ok(Json(package_info(&site, p).await?))
}

async fn set_package(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    Json(req): Json<SetPackage>,
) -> ApiResult<PackageInfo> {
    let p = site.set_package(&pkg, req).await?;
    Ok(Json(package_info(&site, p).await?))
}

async fn delete_package(State(site): State<Arc<Site>>, Path(pkg): Path<String>) -> ApiResult<DeleteReport> {
    Ok(Json(site.delete_package(&pkg).await?))
}

async fn show_package(State(site): State<Arc<Site>>, Path(pkg): Path<String>) -> ApiResult<PackageDetail> {
    let p = site.find_package(&pkg).await?;
    let versions = site
        .store
        .versions(&p.id)
        .await?
        .into_iter()
        .map(|v| VersionInfo {
            source_version: v.version,
            content_root: v.content_root.to_hex(),
            origin: v.origin,
            created_at: v.created_at,
            files: v.stats.files,
            dirs: v.stats.dirs,
            symlinks: v.stats.symlinks,
            total_bytes: v.stats.total_bytes,
            files_added: v.stats.files_added,
            files_changed: v.stats.files_changed,
            files_removed: v.stats.files_removed,
            bytes_hashed: v.stats.bytes_hashed,
        })
        .collect();
    Ok(Json(PackageDetail { package: package_info(&site, p).await?, versions }))
}

async fn refresh(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    body: Option<Json<RefreshRequest>>,
) -> ApiResult<RefreshReport> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    let started = std::time::Instant::now();
    let result = site.refresh(&pkg, req).await;
    // The package may have been named by its name: its series and status go by id.
    let id = match site.store.package(&pkg).await {
        Ok(Some(p)) => p.id,
        _ => pkg,
    };
    site.metrics.record_refresh(&id, &result, started.elapsed());
    if result.is_err() {
        site.metrics.refresh_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Json(result?))
}

async fn gc(State(site): State<Arc<Site>>) -> ApiResult<GcReport> {
    Ok(Json(site.gc().await?))
}

async fn backup(State(site): State<Arc<Site>>, Json(req): Json<BackupRequest>) -> ApiResult<BackupReport> {
    Ok(Json(site.backup(req).await?))
}

async fn backup_progress(State(site): State<Arc<Site>>) -> Json<BackupProgress> {
    Json(site.backup_progress())
}

async fn list_targets(State(site): State<Arc<Site>>) -> ApiResult<Vec<TargetInfo>> {
    Ok(Json(site.store.targets().await?.iter().map(super::targets::target_info).collect()))
}

async fn add_target(State(site): State<Arc<Site>>, Json(req): Json<AddTarget>) -> ApiResult<TargetInfo> {
    Ok(Json(site.add_target(req).await?))
}

async fn show_target(State(site): State<Arc<Site>>, Path(name): Path<String>) -> ApiResult<TargetDetail> {
    Ok(Json(site.show_target(&name).await?))
}

async fn set_target(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    Json(req): Json<SetTarget>,
) -> ApiResult<SetTargetReport> {
    Ok(Json(site.set_target(&name, req).await?))
}

async fn remove_target(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    body: Option<Json<RemoveTarget>>,
) -> ApiResult<TargetRemoval> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    Ok(Json(site.remove_target(&name, req).await?))
}

async fn status(State(site): State<Arc<Site>>, Path(pkg): Path<String>) -> ApiResult<StatusReport> {
    Ok(Json(site.status(&pkg).await?))
}

#[derive(Debug, Default, serde::Deserialize)]
struct StatusQuery {
    /// Only failing targets (`failed`, `retrying`, `validation_failed`, at any depth), and
    /// only the packages that have some.
    #[serde(default)]
    failed: bool,
}

async fn status_all(
    State(site): State<Arc<Site>>,
    axum::extract::Query(q): axum::extract::Query<StatusQuery>,
) -> ApiResult<Vec<StatusReport>> {
    let mut all = site.status_all().await?;
    if q.failed {
        all.retain_mut(|s| {
            s.retain_failing();
            !s.targets.is_empty()
        });
    }
    Ok(Json(all))
}

async fn retry(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    body: Option<Json<RetryRequest>>,
) -> ApiResult<RetryReport> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    Ok(Json(site.retry(&pkg, req.target.as_deref()).await?))
}

async fn distribute(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    Json(req): Json<DistributeRequest>,
) -> ApiResult<DistributeReport> {
    Ok(Json(site.distribute(&pkg, req).await?))
}

fn required_target(req: &TargetRequest) -> Result<&str, SiteError> {
    req.target.as_deref().ok_or_else(|| SiteError::Invalid("name the target: --dp NAME".into()))
}

async fn redistribute(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    Json(req): Json<TargetRequest>,
) -> ApiResult<ActionReport> {
    Ok(Json(site.request(&pkg, required_target(&req)?, Action::Redistribute).await?))
}

async fn remove(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    Json(req): Json<TargetRequest>,
) -> ApiResult<ActionReport> {
    Ok(Json(site.request(&pkg, required_target(&req)?, Action::Remove).await?))
}

/// A prestaged bundle, streamed (`application/octet-stream`); errors known before the
/// first byte are JSON like any other, a failure later ends the body with an error.
async fn export(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    Json(req): Json<dpsync_api::ExportRequest>,
) -> Result<axum::response::Response, SiteError> {
    let plan = site.plan_export(&pkg, req.version, req.base_version).await?;
    let header = serde_json::to_string(&plan.header).map_err(|e| SiteError::Internal(e.into()))?;
    let rx = crate::export::stream_export(site.clone(), plan);
    let body = axum::body::Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .header("x-dpsync-bundle", header)
        .body(body)
        .map_err(|e| SiteError::Internal(e.into()))
}

async fn rollback(State(site): State<Arc<Site>>, Path(pkg): Path<String>) -> ApiResult<RollbackReport> {
    Ok(Json(site.rollback(&pkg).await?))
}

async fn validate(
    State(site): State<Arc<Site>>,
    Path(pkg): Path<String>,
    Json(req): Json<TargetRequest>,
) -> ApiResult<ValidateReport> {
    Ok(Json(site.validate(&pkg, req.target.as_deref()).await?))
}
