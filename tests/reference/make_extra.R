# Reference fits for models that ../../shared/reference does not cover (several grouping
# factors with vector terms, an observation-level factor, a nested factor), made with the same
# fields. Run from this directory with R 4.2 and lme4 1.1-31 (Debian: r-cran-lme4):
#   Rscript make_extra.R ../../glmm_jax/datasets/data
suppressMessages({library(lme4); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
data_dir <- if (length(args)) args[1] else "../../glmm_jax/datasets/data"
levels_all <- fromJSON(file.path(data_dir, "levels.json"))

load <- function(name, factors, prep) {
  d <- prep(read.csv(file.path(data_dir, paste0(name, ".csv"))))
  lev <- levels_all[[name]]
  for (v in factors) {
    d[[v]] <- if (v %in% names(lev)) factor(as.character(d[[v]]), levels = lev[[v]]) else factor(d[[v]])
  }
  d
}

save_case <- function(id, data, m, py, times) {
  re <- ranef(m, condVar = TRUE)
  ranefs <- lapply(names(re), function(f) {
    r <- re[[f]]
    pv <- attr(r, "postVar")
    sds <- t(sapply(seq_len(nrow(r)), function(i) sqrt(diag(as.matrix(pv[, , i])))))
    if (ncol(r) == 1) sds <- matrix(sds, ncol = 1)
    list(levels = rownames(r), terms = colnames(r), modes = unname(as.matrix(r)), condsd = unname(sds))
  })
  names(ranefs) <- names(re)
  vc <- as.data.frame(VarCorr(m))
  out <- list(
    engine = paste("lme4", packageVersion("lme4")), nobs = nobs(m),
    ngroups = as.list(ngrps(m)), loglik = as.numeric(logLik(m)),
    AIC = AIC(m), BIC = BIC(m), df_resid = df.residual(m),
    fixef_names = names(fixef(m)), fixef = unname(fixef(m)),
    se = unname(sqrt(diag(as.matrix(vcov(m))))), vcov_fixef = unname(as.matrix(vcov(m))),
    theta = unname(getME(m, "theta")),
    varcorr = lapply(seq_len(nrow(vc)), function(i) list(
      grp = vc$grp[i], var1 = vc$var1[i], var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i],
      vcov = vc$vcov[i], sdcor = vc$sdcor[i])),
    ranef = ranefs, singular = isSingular(m),
    conv_messages = m@optinfo$conv$lme4$messages,
    id = id, data = data, r_call = paste(deparse(m@call), collapse = " "),
    py = py, seconds_median = median(times)
  )
  writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, null = "null"), paste0(id, ".json"))
}

fit_case <- function(id, data, formula, family, factors, derive = NULL, prep = identity) {
  d <- load(data, factors, prep)
  f <- as.formula(formula)
  m <- glmer(f, data = d, family = family)
  times <- replicate(3, system.time(glmer(f, data = d, family = family))[["elapsed"]])
  py <- list(formula = formula, family = family, link = NULL, factors = factors)
  if (!is.null(derive)) py$derive <- derive
  py$link <- switch(family, binomial = "logit", poisson = "log")
  save_case(id, data, m, py, times)
}

fit_case("cbpp_obs", "cbpp",
         "cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)",
         "binomial", c("period", "herd", "obs"), derive = "obs = row number 1..n",
         prep = function(d) { d$obs <- factor(seq_len(nrow(d))); d })
fit_case("sim_pois_crossed_rest_slopes", "sim_pois_crossed",
         "count ~ z + offset(log(exposure)) + (1 | site) + (z | year)",
         "poisson", c("site", "year"))
fit_case("exam_crossed_slopes", "exam",
         "success ~ standLRT + (standLRT | school) + (1 | intake)",
         "binomial", c("school", "intake"), derive = "success = (normexam >= 0) as 0/1",
         prep = function(d) { d$success <- as.integer(d$normexam >= 0); d })
fit_case("contraception_nested", "contraception",
         "use ~ age + urban + (1 | district/urban)",
         "binomial", c("district", "urban"), derive = "use = (use == 'Y') as 0/1",
         prep = function(d) { d$use <- as.integer(d$use == "Y"); d })
