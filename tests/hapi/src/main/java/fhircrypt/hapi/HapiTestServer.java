package fhircrypt.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.api.IDaoRegistry;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.provider.BinaryAccessProvider;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.dao.FulltextSearchSvcImpl;
import ca.uhn.fhir.jpa.dao.IFulltextSearchSvc;
import ca.uhn.fhir.jpa.dao.search.HSearchSortHelperImpl;
import ca.uhn.fhir.jpa.dao.search.IHSearchSortHelper;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.hibernate.dialect.Dialect;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import java.util.Map;
import javax.sql.DataSource;

/**
 * HAPI FHIR's JPA server for R4 on an in-memory H2 database: the fhircrypt test suite's second
 * real upstream. Only what a stock HAPI deployment has (the same wiring as HAPI's own
 * jpaserver-starter, minus its optional modules), with settings the tests need: client-assigned
 * ids of any form, external references, deletes and $expunge (so the suite can empty the store),
 * Bulk export and Binary. Search behaviour is HAPI's default, except that cached search results are
 * not reused (a search repeated right after a write sees the write, as on most servers). Batch jobs
 * (Bulk export) advance every 2 s instead of every minute, so an export finishes within a test.
 */
@SpringBootApplication(exclude = {QuartzAutoConfiguration.class})
@Import({
	JpaR4Config.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class, // the in-memory message channels Batch2 (Bulk export) runs on
	ThreadPoolFactoryConfig.class
})
public class HapiTestServer {

	/**
	 * With {@code -Dfhircrypt.exitOnStdinClose=true} the server exits when its standard input closes,
	 * so it never outlives the test process that started it, even one that was killed.
	 */
	public static void main(String[] args) {
		if (Boolean.getBoolean("fhircrypt.exitOnStdinClose")) {
			Thread watchdog = new Thread(() -> {
				try {
					while (System.in.read() != -1) {
						// discard
					}
				} catch (java.io.IOException ignored) {
					// a broken stdin counts as closed
				}
				System.exit(0);
			}, "stdin-watchdog");
			watchdog.setDaemon(true);
			watchdog.start();
		}
		SpringApplication.run(HapiTestServer.class, args);
	}

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		settings.setAllowExternalReferences(true);
		settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
		settings.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
		settings.setDeleteEnabled(true);
		settings.setAllowMultipleDelete(true);
		settings.setExpungeEnabled(true);
		settings.setDeleteExpungeEnabled(true);
		settings.setReuseCachedSearchResultsForMillis(null);
		settings.setJobFastTrackingEnabled(true);
		return settings;
	}

	/** Batch2's maintenance pass (which moves jobs from step to step) every 2 s; HAPI's default is 1 min. */
	@Bean
	public static BeanPostProcessor fastBatchMaintenance() {
		return new BeanPostProcessor() {
			@Override
			public Object postProcessAfterInitialization(Object bean, String name) {
				if (bean instanceof JobMaintenanceServiceImpl maintenance) {
					maintenance.setScheduledJobFrequencyMillis(2000);
				}
				return bean;
			}
		};
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	@Bean
	public IFulltextSearchSvc fullTextSearchSvc() {
		return new FulltextSearchSvcImpl();
	}

	@Bean
	public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
		return new StaleSearchDeletingSvcImpl();
	}

	@Bean
	public IHSearchSortHelper hSearchSortHelper(ISearchParamRegistry registry) {
		return new HSearchSortHelperImpl(registry);
	}

	@Bean
	public IResourceSupportedSvc resourceSupportedSvc(IDaoRegistry daoRegistry) {
		return new DaoRegistryResourceSupportedSvc(daoRegistry);
	}

	@Bean(name = "myResourceCountsCache")
	public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> systemDao) {
		return ResourceCountCacheUtil.newResourceCountCache(systemDao);
	}

	@Bean
	public DatabaseBinaryContentStorageSvcImpl binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	/** HAPI's page sizes as its starter ships them: 20 by default, at most 200. */
	@Bean
	public DatabaseBackedPagingProvider databaseBackedPagingProvider() {
		DatabaseBackedPagingProvider paging = new DatabaseBackedPagingProvider();
		paging.setDefaultPageSize(20);
		paging.setMaximumPageSize(200);
		return paging;
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		factory.setJpaPropertyMap(Map.of(
				"hibernate.dialect", HapiFhirH2Dialect.class.getName(),
				"hibernate.hbm2ddl.auto", "update",
				"hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner",
				"hibernate.physical_naming_strategy",
						"org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy",
				"hibernate.implicit_naming_strategy",
						"org.springframework.boot.orm.jpa.hibernate.SpringImplicitNamingStrategy",
				"hibernate.jdbc.batch_size", "20",
				"hibernate.cache.use_query_cache", "false",
				"hibernate.cache.use_second_level_cache", "false",
				"hibernate.search.enabled", "false"));
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	@Primary
	@Bean
	public HibernatePropertiesProvider hibernatePropertiesProvider() {
		return new HibernatePropertiesProvider() {
			@Override
			public Dialect getDialect() {
				return new HapiFhirH2Dialect();
			}
		};
	}

	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider,
			BulkDataExportProvider bulkDataExportProvider,
			BinaryAccessProvider binaryAccessProvider) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		server.registerProvider(bulkDataExportProvider);
		server.registerProvider(binaryAccessProvider);
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("HAPI FHIR R4 Server (fhircrypt test upstream)");
		server.setServerConformanceProvider(capabilities);
		server.setPagingProvider(pagingProvider);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer server) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(server, "/fhir/*");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
