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
    ActionReport, AddPackage, AddTarget, BackupProgress, BackupReport, BackupRequest, DistributeReport,
    DistributeRequest, ErrorBody, GcReport, PackageDetail, PackageInfo, RefreshReport, RefreshRequest, RollbackReport,
    SiteInfo, StatusReport, TargetInfo, TargetRequest, ValidateReport, VersionInfo,
};
use dpsync_store::Action;

pub fn router(site: Arc<Site>) -> Router {
    Router::new()
        .route("/v1/site", get(site_info))
        .route("/metrics", get(metrics))
        .route("/v1/packages", get(list_packages).post(add_package))
        .route("/v1/packages/{pkg}", get(show_package))
        .route("/v1/packages/{pkg}/refresh", post(refresh))
        .route("/v1/gc", post(gc))
        .route("/v1/backup", get(backup_progress).post(backup))
        .route("/v1/targets", get(list_targets).post(add_target))
        .route("/v1/status", get(status_all))
        .route("/v1/packages/{pkg}/status", get(status))
        .route("/v1/packages/{pkg}/distribute", post(distribute))
        .route("/v1/packages/{pkg}/redistribute", post(redistribute))
        .route("/v1/packages/{pkg}/remove", post(remove))
        .route("/v1/packages/{pkg}/rollback", post(rollback))
        .route("/v1/packages/{pkg}/validate", post(validate))
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
    let name = req.name.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(SiteError::Invalid("package name must be 1–200 printable characters".into()));
    }
    let source = std::path::Path::new(&req.source);
    if !source.is_absolute() {
        return Err(SiteError::Invalid(format!("source folder {:?} must be an absolute path", req.source)));
    }
    match std::fs::metadata(source) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(SiteError::Invalid(format!("source {} is not a folder", source.display()))),
        Err(e) => {
            return Err(SiteError::Invalid(format!(
                "source folder {} cannot be used: {e}; create it or fix the path",
                source.display()
            )));
        }
    }
    site.own_state().check_source(source)?;
    let p = site.store.create_package(&site.cfg.site_code, name, &req.source).await?;
    tracing::info!(package = %p.id, name = %p.name, source = %req.source, "package added");
    Ok(Json(package_info(&site, p).await?))
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

async fn status(State(site): State<Arc<Site>>, Path(pkg): Path<String>) -> ApiResult<StatusReport> {
    Ok(Json(site.status(&pkg).await?))
}

async fn status_all(State(site): State<Arc<Site>>) -> ApiResult<Vec<StatusReport>> {
    Ok(Json(site.status_all().await?))
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
